"""Scoring a checkpoint on the dev set: dev loss, and the task's micro/macro F1 with the same Predictor
(generation + parsing + validation) that `extractor run` uses and the same Evaluator that `extractor eval`
uses."""
from __future__ import annotations

from extractor.training.config import TrainConfig
from extractor.training.loss import target_loss


class DevScorer:
    """One per training: the F1 backend is kept across checkpoints (its fast decoder built once)."""

    def __init__(self, cfg: TrainConfig, task, tokenizer, encoded: list[dict], records: list[dict], golds: dict):
        self.cfg, self.task, self.tokenizer = cfg, task, tokenizer
        self.encoded, self.records, self.golds = encoded, records, golds
        self._backend = None

    def scores(self, model, device) -> dict:
        """The unwrapped model's dev scores, the model left in eval mode."""
        model.eval()
        out = {}
        if self.encoded:
            out["dev_loss"] = self._dev_loss(model, device)
        if self.task is not None and self.records:
            out.update(self._dev_f1(model))
        return out

    def _dev_loss(self, model, device) -> float:
        import torch
        from extractor.training.data import collate
        total, n = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(self.encoded), self.cfg.batch_size):
                chunk = self.encoded[i:i + self.cfg.batch_size]
                batch = {k: v.to(device) for k, v in collate(chunk, self.tokenizer.pad_token_id).items()}
                total += target_loss(model, batch, self.cfg.method).item() * len(chunk)
                n += len(chunk)
        return total / max(n, 1)

    def _dev_f1(self, model) -> dict:
        """The same generation, parsing and scoring as `extractor run` + `extractor eval`."""
        from extractor.backends.base import GenParams
        from extractor.backends.hf import HFBackend
        from extractor.pipeline import Predictor
        from extractor.scoring.evaluate import Evaluator
        from extractor.scoring.join import GoldRecord, PredRecord
        records = self.records[: self.cfg.eval_limit] if self.cfg.eval_limit else self.records
        backend = self._backend
        if backend is None or backend.model is not model:  # one backend per training: its decoder is kept
            backend = self._backend = HFBackend.from_loaded(model, self.tokenizer, self.cfg.model, batch_size=32)
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
                       GoldRecord(rec["id"], self.golds[rec["id"]]))
        result = ev.result()
        ok = result["status_counts"].get("ok", 0) + result["status_counts"].get("repaired", 0)
        return {"micro_f1": result["micro"]["f1"], "macro_f1": result["macro"]["f1"],
                "parse_rate": ok / max(1, len(records)),
                "field_f1": {c: m["f1"] for c, m in result["classes"].items()}}

