"""The versioned metrics.json document: a result plus its provenance; and the check that a command's output
files are none of its inputs."""
from __future__ import annotations

import os
from pathlib import Path

from extractor import storage
from extractor.errors import InputError
from extractor.provenance import read_manifest, stamp

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


def same_location(a: storage.Location, b: storage.Location) -> bool:
    """Whether two paths name one file: resolved (symlinks, '..'), or the same inode (hard links)."""
    if storage.is_remote(a) or storage.is_remote(b):
        return str(a) == str(b)
    a, b = Path(a), Path(b)
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist yet: not the same file
        return False


def refuse_overwriting_inputs(outputs: dict[str, storage.Location], inputs: dict[str, storage.Location]) -> None:
    """Refuse, before anything is written, an output that is one of the command's inputs."""
    for out_name, out in outputs.items():
        for in_name, inp in inputs.items():
            if same_location(out, inp):
                raise InputError(f"{out_name} {out}: is the {in_name} file {inp}; writing there would destroy "
                                 f"it — choose another path")
