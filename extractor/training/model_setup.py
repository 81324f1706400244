"""What a training run starts from: the model (with its adapter), the tokenizer, the task and the examples,
each checked before the loop starts, and the seeds."""
from __future__ import annotations

import random
from pathlib import Path

from extractor.errors import ExtractorError, InputError
from extractor.training.config import TrainConfig


def load_model(cfg: TrainConfig):
    """(tokenizer, model with the method's adapter): fp32 weights, a pad token, gradient checkpointing when
    asked. Call after `seed_everything`: an adapter's initial weights are drawn here."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32)
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    return tokenizer, wrap(model, cfg)


def wrap(model, cfg: TrainConfig):
    """The model with the method's adapter (peft); full training: the model itself."""
    if cfg.method == "full":
        return model
    from peft import LoraConfig, PrefixTuningConfig, PromptEncoderConfig, get_peft_model
    config = {
        "lora": lambda: LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                   target_modules=list(cfg.lora_targets), task_type="CAUSAL_LM"),
        "ptuning": lambda: PromptEncoderConfig(num_virtual_tokens=cfg.virtual_tokens,
                                               encoder_hidden_size=cfg.encoder_hidden, task_type="CAUSAL_LM"),
        "prefix": lambda: PrefixTuningConfig(num_virtual_tokens=cfg.prefix_len, task_type="CAUSAL_LM"),
    }[cfg.method]()
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        hint = "check --lora-target"
        if cfg.method == "lora":
            hint = f"--lora-target takes this model's linear layers: {', '.join(linear_names(model))}"
        raise ExtractorError(f"cannot apply {cfg.method} to {cfg.model} ({str(exc).splitlines()[0][:200]}); "
                             f"{hint}") from None


def load_task(cfg: TrainConfig):
    from extractor.tasks.task import load_task as load
    if cfg.task is None:
        if cfg.gold or cfg.dev_gold:
            raise InputError("--gold needs --task: the task's prompt renders the corpus")
        return None
    return load(cfg.task, tuple(cfg.extra.get("tasks_dirs", ())))


def load_data(cfg: TrainConfig, task, tokenizer):
    """(train examples, dev examples, dev records, dev gold objects by id)."""
    from extractor.training.data import seed_examples, task_examples
    if not cfg.train:
        raise InputError("--train is required: {context, target} JSONL, or a corpus with --gold and --task")
    if cfg.gold:
        train, _, _ = task_examples(Path(cfg.train), Path(cfg.gold), task, tokenizer, cfg.few_shot)
    else:
        train = seed_examples(Path(cfg.train))
    dev, records, golds = [], [], {}
    if cfg.dev:
        if cfg.dev_gold:
            dev, records, golds = task_examples(Path(cfg.dev), Path(cfg.dev_gold), task, tokenizer, cfg.few_shot)
        else:
            dev = seed_examples(Path(cfg.dev))
            records, golds = seed_dev_records(task, dev)
    if not train:
        raise InputError(f"{cfg.train}: no training examples")
    return train, dev, records, golds


def seed_dev_records(task, dev):
    """Seed dev lines: F1 is computed on the passage rendered with the task's prompt (as `run` would),
    against the parsed target."""
    from extractor.results.judge import parse_json
    from extractor.store.records import seed_passage
    field0 = task.spec.input_fields[0] if task else "text"
    records = [{"id": e.id, "values": {field0: seed_passage(e.prompt)}, "row": {}} for e in dev]
    golds = {e.id: parse_json(e.target)[0] for e in dev}
    return records, golds


def linear_names(model) -> list[str]:
    """The names --lora-target matches: each linear layer's own name (q_proj, up_proj, ...), the output head
    left out (LoRA on it is rarely meant)."""
    import torch
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    return sorted(names - {"lm_head"})


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
