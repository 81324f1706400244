"""The training loop: accelerate for devices and processes, peft for adapters, F1-scored checkpoints.

Every --save-steps the main process computes dev loss and the task's micro/macro F1 with the same
Predictor (generation + parsing + validation) that `extractor run` uses and the same Evaluator that
`extractor eval` uses, saves `checkpoint-N` (adapter or full model, tokenizer, and a training state for
--resume: optimizer, scheduler, RNG states, step), updates `best`, appends to metrics.jsonl and redraws
the loss and F1 curves.
"""
from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from extractor.errors import ExtractorError, InputError
from extractor.store.provenance import stamp, write_json_atomic

STATE_FILE = "trainer_state.pt"


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


class Trainer:
    def __init__(self, cfg: TrainConfig, log=print):
        self.cfg = cfg
        self.log = log if not cfg.quiet else (lambda *a, **k: None)
        self.out = Path(cfg.out)
        self._clock: float | None = None  # when the loop started (the time-aware schedule reads it)
        self._eval_backend = None  # dev F1's backend, kept across checkpoints (its fast decoder built once)

    # -- setup ---------------------------------------------------------------------------------------
    def setup(self) -> None:
        import torch
        from accelerate import Accelerator, DataLoaderConfiguration
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging
        from extractor.backends.hf import check_model_dir
        hf_logging.disable_progress_bar()
        cfg = self.cfg
        check_model_dir(Path(cfg.model))
        mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[cfg.precision]
        # A seedable sampler makes each epoch's order a function of (seed, epoch): resume can skip to it.
        self.acc = Accelerator(gradient_accumulation_steps=cfg.grad_accum, mixed_precision=mixed,
                               cpu=not torch.cuda.is_available(),
                               dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
        _seed_everything(cfg.seed)
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32)
        if cfg.grad_checkpointing:
            model.gradient_checkpointing_enable()
            model.config.use_cache = False
        self.model = self._wrap(model)
        self.task = self._load_task()
        self.train_examples, self.dev_examples, self.dev_records, self.dev_golds = self._load_data()
        self._build_optim()

    def _wrap(self, model):
        cfg = self.cfg
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
                hint = f"--lora-target takes this model's linear layers: {', '.join(_linear_names(model))}"
            raise ExtractorError(f"cannot apply {cfg.method} to {cfg.model} ({str(exc).splitlines()[0][:200]}); "
                                 f"{hint}") from None

    def _load_task(self):
        from extractor.tasks.task import load_task
        if self.cfg.task is None:
            if self.cfg.gold or self.cfg.dev_gold:
                raise InputError("--gold needs --task: the task's prompt renders the corpus")
            return None
        return load_task(self.cfg.task, tuple(self.cfg.extra.get("tasks_dirs", ())))

    def _load_data(self):
        from extractor.training.data import seed_examples, task_examples
        cfg = self.cfg
        if not cfg.train:
            raise InputError("--train is required: {context, target} JSONL, or a corpus with --gold and --task")
        if cfg.gold:
            train, _, _ = task_examples(Path(cfg.train), Path(cfg.gold), self.task, self.tokenizer, cfg.few_shot)
        else:
            train = seed_examples(Path(cfg.train))
        dev, records, golds = [], [], {}
        if cfg.dev:
            if cfg.dev_gold:
                dev, records, golds = task_examples(Path(cfg.dev), Path(cfg.dev_gold), self.task, self.tokenizer,
                                                    cfg.few_shot)
            else:
                dev = seed_examples(Path(cfg.dev))
                records, golds = self._seed_dev_records(dev)
        if not train:
            raise InputError(f"{cfg.train}: no training examples")
        return train, dev, records, golds

    def _seed_dev_records(self, dev):
        """Seed dev lines: F1 is computed on the passage rendered with the task's prompt (as `run` would),
        against the parsed target."""
        from extractor.store.records import seed_passage
        from extractor.results.judge import parse_json
        field0 = self.task.spec.input_fields[0] if self.task else "text"
        records = [{"id": e.id, "values": {field0: seed_passage(e.prompt)}, "row": {}} for e in dev]
        golds = {e.id: parse_json(e.target)[0] for e in dev}
        return records, golds

    def _build_optim(self):
        import torch
        from torch.utils.data import DataLoader
        from transformers import get_cosine_schedule_with_warmup
        from extractor.training.data import collate, encode
        cfg = self.cfg
        encoded = [encode(e, self.tokenizer, cfg.max_source_len, cfg.max_target_len) for e in self.train_examples]
        pad = self.tokenizer.pad_token_id
        self.loader = DataLoader(encoded, batch_size=cfg.batch_size, shuffle=True,
                                 generator=torch.Generator().manual_seed(cfg.seed), collate_fn=lambda b: collate(b, pad))
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optim = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
        steps_per_epoch = math.ceil(len(self.loader) / max(1, self.acc.num_processes) / cfg.grad_accum)
        self.total_steps = cfg.max_steps or max(1, int(steps_per_epoch * cfg.epochs))
        if cfg.anneal_by_time and cfg.max_seconds:
            self.sched = torch.optim.lr_scheduler.LambdaLR(self.optim, self._time_aware_lr)
        else:
            self.sched = get_cosine_schedule_with_warmup(self.optim, int(cfg.warmup * self.total_steps),
                                                         self.total_steps)
        # The scheduler is not handed to accelerate, which would step it once per process per step.
        self.model, self.optim, self.loader = self.acc.prepare(self.model, self.optim, self.loader)
        self.dev_encoded = [encode(e, self.tokenizer, cfg.max_source_len, cfg.max_target_len) for e in self.dev_examples]

    def _time_aware_lr(self, step: int) -> float:
        """The LR factor at the progress of the faster-spent budget (steps or seconds): linear warmup, then
        cosine to 0. Before the loop starts the clock reads 0."""
        elapsed = time.perf_counter() - self._clock if self._clock is not None else 0.0
        progress = min(1.0, max(step / self.total_steps, elapsed / self.cfg.max_seconds))
        if progress < self.cfg.warmup:
            return progress / self.cfg.warmup
        return 0.5 * (1.0 + math.cos(math.pi * (progress - self.cfg.warmup) / max(1e-9, 1.0 - self.cfg.warmup)))

    # -- the loop ------------------------------------------------------------------------------------
    def train(self) -> dict:
        cfg = self.cfg
        self.setup()
        step, epoch, position = self._maybe_resume()
        self.out.mkdir(parents=True, exist_ok=True)
        if self.acc.is_main_process:
            write_json_atomic(self.out / "train_args.json", {**asdict(self.cfg), **stamp(),
                                                             "processes": self.acc.num_processes})
        start = self._clock = time.perf_counter()
        tokens = 0
        window = {"loss": 0.0, "n": 0, "t": start, "tokens": 0}
        self.model.train()
        done = step >= self.total_steps
        while not done:
            self.loader.set_epoch(epoch)
            loader = self.acc.skip_first_batches(self.loader, position) if position else self.loader
            for batch in loader:
                position += 1
                with self.acc.accumulate(self.model):
                    loss = self._loss(self.model, batch)
                    self.acc.backward(loss)
                    self.optim.step()
                    if self.acc.sync_gradients:
                        self.sched.step()
                    self.optim.zero_grad()
                window["loss"] += loss.item()
                window["n"] += 1
                n_tok = int(batch["attention_mask"].sum()) * self.acc.num_processes
                tokens += n_tok
                window["tokens"] += n_tok
                if not self.acc.sync_gradients:
                    continue
                step += 1
                if step % cfg.logging_steps == 0:
                    self._log_progress(step, window, start)
                stop = self._out_of_budget(step, start)
                if step % cfg.save_steps == 0 or step >= self.total_steps or stop:
                    f1 = self._checkpoint(step, epoch, position)
                    stop = stop or (cfg.target_f1 is not None and f1 is not None and f1 >= cfg.target_f1)
                if step >= self.total_steps or stop:
                    done = True
                    break
            else:
                epoch, position = epoch + 1, 0
        self.acc.wait_for_everyone()
        return self._final(step, time.perf_counter() - start, tokens)

    def _loss(self, model, batch: dict):
        """Causal LM loss on target tokens. For full and LoRA training the vocabulary projection runs only
        from the first target position on (prompts are most of each sequence, and the loss ignores them)."""
        if self.cfg.method not in ("full", "lora"):  # prompt learning prepends virtual tokens: plain path
            return model(**batch).loss
        import torch.nn.functional as F
        from extractor.training.data import IGNORE
        labels = batch["labels"]
        first = int((labels != IGNORE).float().argmax(dim=1).min())  # earliest target position in the batch
        keep = max(first - 1, 0)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       logits_to_keep=labels.shape[1] - keep).logits  # positions keep .. end
        targets = labels[:, keep + 1:]
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                               ignore_index=IGNORE)

    def _out_of_budget(self, step: int, start: float) -> bool:
        if self.cfg.max_seconds is None:
            return False
        import torch
        # Every process must agree, or one would wait forever at the next collective.
        flag = torch.tensor([float(time.perf_counter() - start >= self.cfg.max_seconds)], device=self.acc.device)
        return bool(self.acc.reduce(flag, reduction="sum").item() > 0)

    def _log_progress(self, step: int, window: dict, start: float) -> None:
        now = time.perf_counter()
        secs = max(now - window["t"], 1e-9)
        rate = self.cfg.logging_steps / secs
        eta = (self.total_steps - step) / rate if rate else float("inf")
        if self.acc.is_main_process:
            self.log(f"step {step}/{self.total_steps} loss {window['loss'] / max(window['n'], 1):.4f} "
                     f"{rate:.2f} steps/s {window['tokens'] / secs:.0f} tok/s ETA {eta:.0f}s "
                     f"lr {self.sched.get_last_lr()[0]:.2e}")
            self._append_metrics({"kind": "train", "step": step, "loss": window["loss"] / max(window["n"], 1),
                                  "steps_per_s": rate, "tokens_per_s": window["tokens"] / secs,
                                  "lr": self.sched.get_last_lr()[0],
                                  "elapsed_s": now - start})
        window.update(loss=0.0, n=0, t=now, tokens=0)

    # -- evaluation and checkpoints --------------------------------------------------------------------
    def _checkpoint(self, step: int, epoch: int, position: int) -> float | None:
        self.acc.wait_for_everyone()
        f1 = None
        if self.acc.is_main_process:
            record = {"kind": "eval", "step": step, **self._evaluate()}
            f1 = record.get("micro_f1")
            self._append_metrics(record)
            path = self.out / f"checkpoint-{step}"
            self._save_weights(path)
            self._save_state(path, step, epoch, position)
            self._update_best(path, record)
            self._draw_curves()
            shown = ", ".join(f"{k} {v:.4f}" for k, v in record.items() if isinstance(v, float))
            self.log(f"checkpoint-{step}: {shown}")
        self.acc.wait_for_everyone()
        self.model.train()
        return self._broadcast(f1)

    def _broadcast(self, value: float | None) -> float | None:
        """The main process's dev F1, on every process (they all decide together whether to stop)."""
        from accelerate.utils import broadcast_object_list
        box = [value]
        if self.acc.num_processes > 1:
            broadcast_object_list(box, from_process=0)
        return box[0]

    def _evaluate(self) -> dict:
        model = self.acc.unwrap_model(self.model)
        model.eval()
        out = {}
        if self.dev_encoded:
            out["dev_loss"] = self._dev_loss(model)
        if self.task is not None and self.dev_records:
            out.update(self._dev_f1(model))
        return out

    def _dev_loss(self, model) -> float:
        import torch
        from extractor.training.data import collate
        total, n = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(self.dev_encoded), self.cfg.batch_size):
                chunk = self.dev_encoded[i:i + self.cfg.batch_size]
                batch = {k: v.to(self.acc.device) for k, v in collate(chunk, self.tokenizer.pad_token_id).items()}
                total += self._loss(model, batch).item() * len(chunk)
                n += len(chunk)
        return total / max(n, 1)

    def _dev_f1(self, model) -> dict:
        """The same generation, parsing and scoring as `extractor run` + `extractor eval`."""
        from extractor.backends.base import GenParams
        from extractor.backends.hf import HFBackend
        from extractor.pipeline import Predictor
        from extractor.scoring.evaluate import Evaluator
        from extractor.scoring.join import GoldRecord, PredRecord
        records = self.dev_records[: self.cfg.eval_limit] if self.cfg.eval_limit else self.dev_records
        backend = self._eval_backend
        if backend is None or backend.model is not model:  # one backend per training: its decoder is kept
            backend = self._eval_backend = HFBackend.from_loaded(model, self.tokenizer, self.cfg.model,
                                                                 batch_size=32)
        else:
            backend.weights_changed()
        gen = self.task.spec.generation
        params = GenParams(max_new_tokens=self.cfg.eval_max_new_tokens or gen.max_new_tokens,
                           constrained=self.cfg.constrained_eval)
        predictor = Predictor(self.task, backend, params, on_long="truncate", few_shot=self.cfg.few_shot)
        ev = Evaluator(self.task)
        for i in range(0, len(records), 64):
            chunk = records[i:i + 64]
            for rec, row in zip(chunk, predictor.predict(chunk)):
                ev.add(rec["id"], PredRecord(rec["id"], row["prediction"], row["status"]),
                       GoldRecord(rec["id"], self.dev_golds[rec["id"]]))
        result = ev.result()
        ok = result["status_counts"].get("ok", 0) + result["status_counts"].get("repaired", 0)
        return {"micro_f1": result["micro"]["f1"], "macro_f1": result["macro"]["f1"],
                "parse_rate": ok / max(1, len(records)),
                "field_f1": {c: m["f1"] for c, m in result["classes"].items()}}

    def _save_weights(self, path: Path) -> None:
        model = self.acc.unwrap_model(self.model)
        path.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(path, safe_serialization=True)
        self.tokenizer.save_pretrained(path)

    def _save_state(self, path: Path, step: int, epoch: int, position: int) -> None:
        import numpy as np
        import torch
        state = {"step": step, "epoch": epoch, "position": position, "optimizer": self.optim.state_dict(),
                 "scheduler": self.sched.state_dict(), "python_rng": random.getstate(),
                 "numpy_rng": np.random.get_state(), "torch_rng": torch.get_rng_state(),
                 "total_steps": self.total_steps}
        tmp = path / (STATE_FILE + ".tmp")
        torch.save(state, tmp)
        tmp.replace(path / STATE_FILE)  # the state file marks a complete checkpoint

    def _update_best(self, path: Path, record: dict) -> None:
        key = "micro_f1" if self.cfg.best_by == "f1" and "micro_f1" in record else "dev_loss"
        if key not in record:
            return
        value = record[key] if key == "micro_f1" else -record[key]
        best_file = self.out / "best.json"
        best = json.loads(best_file.read_text()) if best_file.exists() else None
        if best is not None and _rank(best["score"], best["metrics"]) >= _rank(value, record):
            return
        target = self.out / "best"
        tmp = self.out / "best.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(path, tmp, ignore=shutil.ignore_patterns(STATE_FILE))
        if self.cfg.merge_lora and self.cfg.method == "lora":
            self._merge_into(tmp)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        write_json_atomic(best_file, {"checkpoint": path.name, "step": record["step"], "by": key, "score": value,
                                      "metrics": record})

    def _merge_into(self, folder: Path) -> None:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        base = AutoModelForCausalLM.from_pretrained(self.cfg.model)
        merged = PeftModel.from_pretrained(base, folder).merge_and_unload()
        for f in folder.iterdir():
            if f.name.startswith("adapter_"):
                f.unlink()
        merged.save_pretrained(folder, safe_serialization=True)

    def _append_metrics(self, record: dict) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")

    def _draw_curves(self) -> None:
        from extractor.training.curves import draw_curves
        draw_curves(self.out / "metrics.jsonl", self.out)

    # -- resume and end ------------------------------------------------------------------------------
    def _maybe_resume(self) -> tuple[int, int, int]:
        if not self.cfg.resume:
            if self.out.exists() and any(self.out.glob("checkpoint-*")) and self.acc.is_main_process:
                raise ExtractorError(f"{self.out} already holds checkpoints; pass --resume or use another --out")
            return 0, 0, 0
        ckpt = latest_checkpoint(self.out)
        if ckpt is None:
            self.log(f"no checkpoint in {self.out}; starting from scratch")
            return 0, 0, 0
        import numpy as np
        import torch
        state = torch.load(ckpt / STATE_FILE, weights_only=False)
        self._load_weights(ckpt)
        self.optim.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        random.setstate(state["python_rng"])
        np.random.set_state(state["numpy_rng"])
        torch.set_rng_state(state["torch_rng"])
        self.log(f"resumed from {ckpt.name} (step {state['step']})")
        return state["step"], state["epoch"], state["position"]

    def _load_weights(self, ckpt: Path) -> None:
        from safetensors.torch import load_file
        model = self.acc.unwrap_model(self.model)
        if self.cfg.method == "full":
            model.load_state_dict(load_file(ckpt / "model.safetensors"), strict=False)
        else:
            from peft import set_peft_model_state_dict
            set_peft_model_state_dict(model, load_file(ckpt / "adapter_model.safetensors"))

    def _final(self, step: int, seconds: float, tokens: int) -> dict:
        best_file = self.out / "best.json"
        best = json.loads(best_file.read_text()) if best_file.exists() else None
        summary = {"steps": step, "seconds": seconds, "tokens": tokens, "best": best,
                   "processes": self.acc.num_processes}
        if self.acc.is_main_process:
            write_json_atomic(self.out / "summary.json", summary)
        return summary


def _linear_names(model) -> list[str]:
    """The names --lora-target matches: each linear layer's own name (q_proj, up_proj, ...), the output head
    left out (LoRA on it is rarely meant)."""
    import torch
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    return sorted(names - {"lm_head"})


def _rank(score: float, metrics: dict) -> tuple:
    """Checkpoints by score; equal scores (dev F1 often saturates) by lower dev loss."""
    return score, -metrics.get("dev_loss", math.inf)


def latest_checkpoint(out: Path) -> Path | None:
    done = [p for p in out.glob("checkpoint-*") if (p / STATE_FILE).is_file() and p.name.split("-")[-1].isdigit()]
    return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)


def _seed_everything(seed: int) -> None:
    import numpy as np
    import torch
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
