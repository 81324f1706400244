"""The versioned metrics.json document: a result plus its provenance."""
from __future__ import annotations

from pathlib import Path

from extractor.store.provenance import read_manifest, stamp

METRICS_FORMAT = "extractor.metrics/1"


def metrics_document(task, result: dict, pred_path: Path, gold_path: Path | None, corpus=None,
                     corpus_join=None) -> dict:
    """corpus_join: how predictions met the --corpus (records, matched, extra), when one was given."""
    manifest = read_manifest(pred_path)
    extra = {"corpus": str(corpus), "corpus_join": vars(corpus_join)} if corpus_join is not None else {}
    return {
        "format": METRICS_FORMAT,
        "provenance": {**task.provenance(), **stamp(), "predictions": str(pred_path),
                       "gold": str(gold_path) if gold_path is not None else None, **extra,
                       "match": task.spec.scoring.match, "scoring_kind": task.spec.scoring.kind,
                       "zero_division": 0, "prediction_manifest": manifest},
        **result,
    }
