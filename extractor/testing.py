"""Tiny local models for tests and the demo: no hub access anywhere.

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
    from extractor.prompting import PromptBuilder
    from extractor.synth import generate
    from extractor.tasks import available, load_task
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


def stand_in_decode(grammar, rows: int, budget: int, seed: int, width: int, choose_from: int | None = None,
                    workers: int = 0) -> dict:
    """Constrained decoding without a model, as FastDecoder's packed rows do it: each row takes its
    preferred allowed token (a seeded random preference over the first `choose_from` ids, rotated every
    step), like a random-weight model. `width` is the logits' width (the model's head); `workers`: grammar
    worker processes (BatchConstraint's). Returns each row's tokens and finish reason, the tokens decoded,
    the seconds spent in the constraint, its stats and the engine's seconds per step."""
    import time

    import numpy as np
    import torch

    from extractor.constrain.batch import BatchConstraint
    constraint = BatchConstraint(grammar, workers=workers)
    choose_from = choose_from or width
    pref = np.random.default_rng(seed).random((rows, choose_from)).astype(np.float32)
    keys = list(range(rows))
    constraint.start(keys, [budget] * rows)
    out: dict[int, list[int]] = {k: [] for k in keys}
    reasons: dict[int, str] = {}

    def choose(alive, logits) -> list[int]:
        picks = []
        for i, k in enumerate(alive):  # masked logits: allowed tokens kept their 0
            picks.append(int(np.argmax(np.where(logits[i, :choose_from] > -1, pref[k], -2))))
            pref[k] = np.roll(pref[k], 7)
        return picks

    logits = torch.zeros(rows, width)
    start = time.perf_counter()
    constraint.mask_first(keys, logits, keys)
    seconds = time.perf_counter() - start
    alive, last = keys, choose(keys, logits.numpy())
    decoded = 0
    step_cpu: list[float] = []  # the grammar engine's seconds in each step (a slow step stalls the GPU)
    while alive:
        keep = []
        for k, tok in zip(alive, last):
            decoded += 1
            if tok in grammar.stop_token_ids:
                reasons[k] = "stop"
            else:
                out[k].append(tok)
                if len(out[k]) < budget:
                    keep.append((k, tok))
                    continue
                reasons[k] = "length"
            constraint.release(k)
        if not keep:
            break
        alive, last = [k for k, _ in keep], [t for _, t in keep]
        logits = torch.zeros(len(alive), width)
        start, engine_before = time.perf_counter(), constraint.stats["cpu_s"]
        constraint.hook(alive, last, alive)(logits)
        seconds += time.perf_counter() - start
        step_cpu.append(constraint.stats["cpu_s"] - engine_before)
        last = choose(alive, logits.numpy())
    return {"tokens": [out[k] for k in keys], "reasons": [reasons[k] for k in keys], "decoded": decoded,
            "seconds": seconds, "stats": dict(constraint.stats), "step_cpu_s": step_cpu,
            "texts": [b"".join(grammar.token_bytes[t] for t in out[k]).decode("utf-8", "replace") for k in keys]}


def generate_reference(model, ids: list[int], max_new: int, eos_ids: list[int]) -> list[int]:
    """The reference a decoder is held to: `generate`'s greedy tokens for one prompt (batch 1), cut after
    the first EOS (kept), as FastDecoder returns them."""
    import torch
    device = next(model.parameters()).device
    prompt = torch.tensor([ids], device=device)
    with torch.inference_mode():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new,
                             do_sample=False, eos_token_id=list(eos_ids), pad_token_id=0)[0, len(ids):].tolist()
    stop = next((i for i, t in enumerate(out) if t in eos_ids), None)
    return out if stop is None else out[: stop + 1]
