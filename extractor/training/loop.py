"""The training loop: accelerate for devices and processes, peft for adapters, F1-scored checkpoints.

Every --save-steps the main process scores the checkpoint on the dev set (`dev_scoring.py`: dev loss, and
the task's micro/macro F1 as `run` and `eval` compute them), saves `checkpoint-N` (`checkpoints.py`: adapter
or full model, tokenizer, and a training state for --resume: optimizer, scheduler, RNG states, step), updates
`best`, appends to metrics.jsonl and redraws the loss and F1 curves. What the run starts from (model,
adapter, task, examples): `model_setup.py`.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path

from extractor.errors import ExtractorError
from extractor.store.provenance import stamp, write_json_atomic
from extractor.training import checkpoints
from extractor.training.config import TrainConfig
from extractor.training.loss import target_loss


class Trainer:
    def __init__(self, cfg: TrainConfig, log=print):
        self.cfg = cfg
        self.log = log if not cfg.quiet else (lambda *a, **k: None)
        self.out = Path(cfg.out)
        self._clock: float | None = None  # when the loop started (the time-aware schedule reads it)

    # -- setup ---------------------------------------------------------------------------------------
    def setup(self) -> None:
        import torch
        from accelerate import Accelerator, DataLoaderConfiguration
        from transformers.utils import logging as hf_logging
        from extractor.backends.model_files import check_model_dir
        from extractor.training import model_setup
        from extractor.training.dev_scoring import DevScorer
        hf_logging.disable_progress_bar()
        cfg = self.cfg
        check_model_dir(Path(cfg.model))
        mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[cfg.precision]
        # A seedable sampler makes each epoch's order a function of (seed, epoch): resume can skip to it.
        self.acc = Accelerator(gradient_accumulation_steps=cfg.grad_accum, mixed_precision=mixed,
                               cpu=not torch.cuda.is_available(),
                               dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
        model_setup.seed_everything(cfg.seed)
        self.tokenizer, self.model = model_setup.load_model(cfg)
        self.task = model_setup.load_task(cfg)
        self.train_examples, dev_examples, dev_records, dev_golds = model_setup.load_data(cfg, self.task,
                                                                                          self.tokenizer)
        self._build_optim()
        dev_encoded = [self._encode(e) for e in dev_examples]
        self.dev = DevScorer(cfg, self.task, self.tokenizer, dev_encoded, dev_records, dev_golds)

    def _encode(self, example) -> dict:
        from extractor.training.data import encode
        return encode(example, self.tokenizer, self.cfg.max_source_len, self.cfg.max_target_len)

    def _build_optim(self):
        import torch
        from torch.utils.data import DataLoader
        from transformers import get_cosine_schedule_with_warmup
        from extractor.training.data import collate
        cfg = self.cfg
        encoded = [self._encode(e) for e in self.train_examples]
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
                    loss = target_loss(self.model, batch, cfg.method)
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
            model = self.acc.unwrap_model(self.model)
            record = {"kind": "eval", "step": step, **self.dev.scores(model, self.acc.device)}
            f1 = record.get("micro_f1")
            self._append_metrics(record)
            path = self.out / f"checkpoint-{step}"
            checkpoints.save_weights(model, self.tokenizer, path)
            checkpoints.save_state(path, step, epoch, position, self.optim, self.sched, self.total_steps)
            checkpoints.update_best(self.out, path, record, self.cfg)
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

    def _append_metrics(self, record: dict) -> None:
        checkpoints.append_metrics(self.out, record)

    def _draw_curves(self) -> None:
        from extractor.training.curves import draw_curves
        draw_curves(self.out / "metrics.jsonl", self.out)

    # -- resume and end ------------------------------------------------------------------------------
    def _maybe_resume(self) -> tuple[int, int, int]:
        if not self.cfg.resume:
            if self.out.exists() and any(self.out.glob("checkpoint-*")) and self.acc.is_main_process:
                raise ExtractorError(f"{self.out} already holds checkpoints; pass --resume or use another --out")
            return 0, 0, 0
        ckpt = checkpoints.latest_checkpoint(self.out)
        if ckpt is None:
            self.log(f"no checkpoint in {self.out}; starting from scratch")
            return 0, 0, 0
        state = checkpoints.load_checkpoint(ckpt, self.acc.unwrap_model(self.model), self.cfg.method, self.optim,
                                            self.sched)
        self.log(f"resumed from {ckpt.name} (step {state['step']})")
        return state["step"], state["epoch"], state["position"]

    def _final(self, step: int, seconds: float, tokens: int) -> dict:
        summary = {"steps": step, "seconds": seconds, "tokens": tokens, "best": checkpoints.read_best(self.out),
                   "processes": self.acc.num_processes}
        if self.acc.is_main_process:
            write_json_atomic(self.out / "summary.json", summary)
        return summary
