"""Checkpoints on disk: `checkpoint-N` (weights, tokenizer and the training state --resume reads), `best`
(a copy of the best checkpoint, merged when asked), metrics.jsonl and the final summary."""
from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

from extractor.store.provenance import write_json_atomic
from extractor.training.config import TrainConfig

STATE_FILE = "trainer_state.pt"


def save_weights(model, tokenizer, path: Path) -> None:
    """The unwrapped model's weights (adapter or full model) and the tokenizer."""
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def save_state(path: Path, step: int, epoch: int, position: int, optim, sched, total_steps: int) -> None:
    import numpy as np
    import torch
    state = {"step": step, "epoch": epoch, "position": position, "optimizer": optim.state_dict(),
             "scheduler": sched.state_dict(), "python_rng": random.getstate(),
             "numpy_rng": np.random.get_state(), "torch_rng": torch.get_rng_state(),
             "total_steps": total_steps}
    tmp = path / (STATE_FILE + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path / STATE_FILE)  # the state file marks a complete checkpoint


def load_checkpoint(ckpt: Path, model, method: str, optim, sched) -> dict:
    """The checkpoint's weights into the unwrapped model, its optimizer, scheduler and RNG states restored;
    returns its training state (step, epoch, position)."""
    import numpy as np
    import torch
    state = torch.load(ckpt / STATE_FILE, weights_only=False)
    _load_weights(ckpt, model, method)
    optim.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    random.setstate(state["python_rng"])
    np.random.set_state(state["numpy_rng"])
    torch.set_rng_state(state["torch_rng"])
    return state


def _load_weights(ckpt: Path, model, method: str) -> None:
    from safetensors.torch import load_file
    if method == "full":
        model.load_state_dict(load_file(ckpt / "model.safetensors"), strict=False)
    else:
        from peft import set_peft_model_state_dict
        set_peft_model_state_dict(model, load_file(ckpt / "adapter_model.safetensors"))


def update_best(out: Path, path: Path, record: dict, cfg: TrainConfig) -> None:
    """`best` becomes a copy of this checkpoint (its state left out) when it ranks above the best so far."""
    key = "micro_f1" if cfg.best_by == "f1" and "micro_f1" in record else "dev_loss"
    if key not in record:
        return
    value = record[key] if key == "micro_f1" else -record[key]
    best = read_best(out)
    if best is not None and _rank(best["score"], best["metrics"]) >= _rank(value, record):
        return
    target = out / "best"
    tmp = out / "best.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(path, tmp, ignore=shutil.ignore_patterns(STATE_FILE))
    if cfg.merge_lora and cfg.method == "lora":
        _merge_into(tmp, cfg.model)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    write_json_atomic(out / "best.json", {"checkpoint": path.name, "step": record["step"], "by": key,
                                          "score": value, "metrics": record})


def _merge_into(folder: Path, base_model: str) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(base_model)
    merged = PeftModel.from_pretrained(base, folder).merge_and_unload()
    for f in folder.iterdir():
        if f.name.startswith("adapter_"):
            f.unlink()
    merged.save_pretrained(folder, safe_serialization=True)


def _rank(score: float, metrics: dict) -> tuple:
    """Checkpoints by score; equal scores (dev F1 often saturates) by lower dev loss."""
    return score, -metrics.get("dev_loss", math.inf)


def latest_checkpoint(out: Path) -> Path | None:
    done = [p for p in out.glob("checkpoint-*") if (p / STATE_FILE).is_file() and p.name.split("-")[-1].isdigit()]
    return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)


def read_best(out: Path) -> dict | None:
    best_file = out / "best.json"
    return json.loads(best_file.read_text()) if best_file.exists() else None


def append_metrics(out: Path, record: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, ensure_ascii=False) + "\n")
