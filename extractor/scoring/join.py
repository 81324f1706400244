"""Predictions and gold read and joined by id, streaming.

Predictions and gold are read in lockstep: when both files list ids in the same order (the usual case,
e.g. `run` output against the generator's gold) nothing is buffered and memory stays flat; ids out of
order are matched through small pending maps. An id twice in one file is an error. A corpus joins the same
way, giving each prediction its record's text.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from extractor.errors import InputError
from extractor.results.judge import STATUSES, judge, parse_json
from extractor.scoring.grounding import check_spans
from extractor.store.records import id_key, seed_passage
from extractor.store.writers import iter_rows
from extractor.tasks.validation import Validator


@dataclass
class GoldRecord:
    id: str
    obj: object
    text: str | None = None


@dataclass
class PredRecord:
    id: str
    obj: object
    status: str
    text: str | None = None
    spans: dict | None = None
    raw: str | None = None
    error: str | None = None


def iter_gold(path: Path) -> Iterator[GoldRecord]:
    """Gold lines: {id, gold}, predictions-format lines, or the seed's {context, target} lines."""
    for line, row in iter_rows(path):
        rid = str(row["id"]) if row.get("id") is not None else str(line)
        if "gold" in row:
            obj = row["gold"]
        elif "prediction" in row:
            obj = row["prediction"]
        elif isinstance(row.get("target"), str):
            obj, found, _ = parse_json(row["target"])
            if not found:
                raise InputError(f"{path}:{line}: target holds no JSON value; fix the gold line")
        else:
            raise InputError(f"{path}:{line}: unknown gold line; expected {{id, gold}}, a predictions line "
                             f"or {{context, target}} (keys here: {', '.join(row)})")
        text = row.get("text") if isinstance(row.get("text"), str) else None
        if text is None and isinstance(row.get("context"), str):
            text = seed_passage(row["context"])
        yield GoldRecord(rid, obj, text)


def iter_predictions(path: Path, validator: Validator | None = None) -> Iterator[PredRecord]:
    """Prediction lines as `run` writes them. With a validator, statuses are recomputed from `raw`."""
    for line, row in iter_rows(path):
        rid = str(row["id"]) if row.get("id") is not None else str(line)
        raw = row.get("raw") if isinstance(row.get("raw"), str) else None
        if validator is not None and raw is not None:
            parsed = judge(raw, row.get("finish_reason") or "stop", validator)
            obj, status, error = parsed.prediction, parsed.status, parsed.error
        else:
            obj, error = row.get("prediction"), row.get("error")
            status = row.get("status") or ("ok" if obj is not None else "invalid_json")
            if status not in STATUSES:
                raise InputError(f"{path}:{line}: unknown status '{status}'; expected one of {', '.join(STATUSES)}")
        text = row.get("text") if isinstance(row.get("text"), str) else None
        kept = row.get("kept")
        if text is None and isinstance(kept, dict) and isinstance(kept.get("text"), str):
            text = kept["text"]
        spans = row.get("spans")
        if spans is not None:
            try:
                spans = check_spans(spans, f"{path}:{line}")
            except ValueError as exc:
                raise InputError(f"{exc}; fix the row or drop its spans") from None
        yield PredRecord(rid, obj, status, text, spans, raw, error if isinstance(error, str) else None)


@dataclass
class CorpusText:
    id: str
    text: str


@dataclass
class CorpusJoin:
    """How predictions and a corpus met: corpus records, those with a prediction, predictions not in it."""

    records: int = 0
    matched: int = 0
    extra: int = 0


def with_corpus_text(preds: Iterator[PredRecord], corpus, pred_path: Path, stats: CorpusJoin,
                     field: str) -> Iterator[PredRecord]:
    """Predictions with their record's text from a corpus (a `CorpusReader`), joined by id; the corpus's text
    wins over a row's own."""
    texts = (CorpusText(r["id"], r["values"][field]) for batch in corpus for r in batch)
    for _, pred, rec in join(preds, texts, pred_path, corpus.path):
        stats.records += rec is not None
        if pred is None:
            continue
        if rec is None:
            stats.extra += 1
        else:
            stats.matched += 1
            pred.text = rec.text
        yield pred


def join(preds: Iterator[PredRecord], golds: Iterator[GoldRecord], pred_path: Path, gold_path: Path):
    """Yield (id, PredRecord | None, GoldRecord | None) for every id in either file, each once."""
    pending_pred: dict[str, PredRecord] = {}
    pending_gold: dict[str, GoldRecord] = {}
    seen_pred: set[int] = set()
    seen_gold: set[int] = set()
    p_iter, g_iter = iter(preds), iter(golds)
    p_done = g_done = False
    while not (p_done and g_done):
        p = None if p_done else next(p_iter, None)
        g = None if g_done else next(g_iter, None)
        p_done, g_done = p_done or p is None, g_done or g is None
        if p is not None:
            _check_unique(p.id, seen_pred, pred_path)
        if g is not None:
            _check_unique(g.id, seen_gold, gold_path)
        if p is not None and g is not None and p.id == g.id:
            yield p.id, p, g
            continue
        if p is not None:
            if p.id in pending_gold:
                yield p.id, p, pending_gold.pop(p.id)
            else:
                pending_pred[p.id] = p
        if g is not None:
            if g.id in pending_pred:
                yield g.id, pending_pred.pop(g.id), g
            else:
                pending_gold[g.id] = g
    for rid, g in pending_gold.items():
        yield rid, None, g
    for rid, p in pending_pred.items():
        yield rid, p, None


def _check_unique(rid: str, seen: set[int], path: Path) -> None:
    key = id_key(rid)
    if key in seen:
        raise InputError(f"{path}: duplicate id '{rid}'; each id must appear once")
    seen.add(key)
