"""The settings of one training run, as `extractor train` gathers them."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TrainConfig:
    model: str
    out: str
    method: str = "lora"
    task: str | None = None
    train: str | None = None  # {context,target} JSONL, or a corpus with --gold
    gold: str | None = None
    dev: str | None = None
    dev_gold: str | None = None
    max_source_len: int = 512
    max_target_len: int = 256
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: tuple = ("q_proj", "v_proj")
    virtual_tokens: int = 16
    encoder_hidden: int = 128
    prefix_len: int = 16
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup: float = 0.05  # fraction of total steps
    epochs: float = 1.0
    max_steps: int | None = None
    max_seconds: float | None = None
    # With max_seconds: warmup and cosine decay follow whichever budget, steps or seconds, is spent faster,
    # so a run cut short by the clock (a busy machine) still ends with the learning rate annealed.
    anneal_by_time: bool = False
    target_f1: float | None = None  # stop once dev micro F1 reaches this
    precision: str = "fp32"
    grad_checkpointing: bool = False
    seed: int = 0
    logging_steps: int = 10
    save_steps: int = 100
    eval_limit: int | None = 200
    eval_max_new_tokens: int | None = None
    constrained_eval: bool = False
    best_by: str = "f1"
    few_shot: int | None = None  # the task's few-shot examples used in prompts (None: all, as `run`)
    merge_lora: bool = False
    resume: bool = False
    quiet: bool = False
    extra: dict = field(default_factory=dict)
