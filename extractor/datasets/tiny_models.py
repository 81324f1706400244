"""Tiny local models for the demo, `extractor bench`'s benchmarks and the tests: no hub access anywhere.

`build_tiny_model` trains a byte-level BPE tokenizer with `tokenizers` on synthetic job postings and the
tasks' prompts, builds a Qwen2-style model with random weights (head dim 32, so vLLM's CPU attention
accepts it; init std 0.2, so a random model emits varied tokens) and saves both as a normal Hugging Face
directory with safetensors weights and a chat template.
"""
from __future__ import annotations

import json
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
EOS = "<|im_end|>"
PAD = "<|endoftext|>"
SPECIAL = [PAD, "<|im_start|>", EOS]


def tokenizer_corpus(n_postings: int = 2000, seed: int = 0) -> list[str]:
    """Text the tokenizer learns from: postings, their gold JSON, and every bundled task's prompt."""
    from extractor.tasks.prompting import PromptBuilder
    from extractor.datasets.synth import generate
    from extractor.tasks.task import available, load_task
    texts = []
    for rec, gold in generate(n_postings, seed=seed, lang="mix", split="all"):
        texts.append(rec["text"])
        texts.append(json.dumps(gold["gold"], ensure_ascii=False))
    for name in available():
        task = load_task(name)
        texts.append(PromptBuilder(task).build({f: "" for f in task.spec.input_fields}))
        texts.append(json.dumps(task.schema, ensure_ascii=False))
    return texts


# CJK characters, full-width punctuation and Latin letters: with `per_char`, each is a pre-token of its own.
CHAR = r"[\u2e80-\u9fff\uf900-\ufaff\uff00-\uffef\u3000-\u303fA-Za-z]"


def train_tokenizer(texts: list[str], vocab_size: int = 1024, chat_template: bool = True, per_char: bool = False,
                    whole: tuple[str, ...] = ()):
    """Byte-level BPE. `per_char`: every CJK character, Latin letter and digit is a pre-token of its own, so
    no merge crosses a character boundary: a value is the same tokens in a posting as in the answer, and an
    unseen value is made of tokens seen in training (a BPE trained on templated text merges values, and cues
    with them, into single tokens, so the model must memorise values instead of copying them); merges are
    left for punctuation runs such as the JSON's `"], "`. `whole`: strings kept as one token each (fixed
    prompt lines, field names), which shortens every sequence without touching values."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = byte_level if not per_char else pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(CHAR), "isolated"), pre_tokenizers.Digits(individual_digits=True), byte_level])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, padding_side="left")
    if whole:
        fast.add_tokens([AddedToken(t, normalized=False, special=False) for t in whole])
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(out_dir: str | Path, *, vocab_size: int = 1024, hidden: int = 64, layers: int = 2,
                     heads: int = 2, kv_heads: int = 1, intermediate: int = 128, init_std: float = 0.2,
                     max_positions: int = 2048, seed: int = 0, chat_template: bool = True,
                     texts: list[str] | None = None, per_char: bool = False, whole: tuple[str, ...] = ()) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(texts or tokenizer_corpus(seed=seed), vocab_size, chat_template, per_char, whole)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         head_dim=hidden // heads, max_position_embeddings=max_positions,
                         initializer_range=init_std, tie_word_embeddings=True,
                         bos_token_id=tokenizer.convert_tokens_to_ids(EOS),
                         eos_token_id=tokenizer.convert_tokens_to_ids(EOS),
                         pad_token_id=tokenizer.convert_tokens_to_ids(PAD))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
