"""The output row: one per input record, whichever runner wrote it (`extractor run`, a `--gpus` worker, a Ray
actor). Its keys, and how a prediction row and an error row are built, are spelled here only.

A row: id, task, prediction (the parsed object or None), status (`outputs.STATUSES`), error, raw (the model's
text, kept so `eval --reparse` can judge it again), prompt_tokens, output_tokens, finish_reason, adapter, then
`spans` (where each extracted value is in the record's text, `scoring/grounding.py`; scored statuses of
tasks with text values only), then the `--keep-field` columns copied from the input record.

A record split into chunks (`--on-long chunk`) is still one row: its prediction is the chunks' merged
(`pipeline/merge.py`), `raw` that prediction's JSON (so `eval --reparse` judges what was scored), and it
also has `chunks` (how many), `chunk_statuses` and `chunk_errors` (each chunk's), `chunk_raw` (each
chunk's text from the model) and `chunk_conflicts` (field path -> the distinct values chunks gave a scalar
field, the kept one first).
"""
from __future__ import annotations

from extractor import jsonutil
from extractor.results.judge import ERROR, Parsed, writable_text

ROW_KEYS = ("id", "task", "prediction", "status", "error", "raw", "prompt_tokens", "output_tokens",
            "finish_reason", "adapter")
CHUNK_KEYS = ("chunks", "chunk_statuses", "chunk_errors", "chunk_raw", "chunk_conflicts")
RESERVED = frozenset((*ROW_KEYS, "spans", *CHUNK_KEYS))  # what a --keep-field column may not be called


def prediction_row(record_id: str, task: str, gen, parsed: Parsed, adapter: str | None) -> dict:
    """A judged generation (`backends.base.Generation`) as a row; its raw text as `judge` read it (unpaired
    surrogates escaped), so that every row can be written and judged again."""
    return {"id": record_id, "task": task, "prediction": parsed.prediction, "status": parsed.status,
            "error": parsed.error, "raw": writable_text(gen.text), "prompt_tokens": gen.prompt_tokens,
            "output_tokens": gen.output_tokens, "finish_reason": gen.finish_reason, "adapter": adapter}


def error_row(record_id: str | None, task: str, error: str, adapter: str | None,
              prompt_tokens: int | None = None) -> dict:
    """A record that got no output (skipped, failed in the backend, or a bad input record): status error."""
    return {"id": record_id, "task": task, "prediction": None, "status": ERROR,
            "error": writable_text(error) if error else error, "raw": "", "prompt_tokens": prompt_tokens,
            "output_tokens": 0, "finish_reason": None, "adapter": adapter}


def keep_fields(row: dict, source: dict, fields) -> dict:
    """Copy the `--keep-field` columns of the input record into the row."""
    for f in fields:
        row[f] = source.get(f)
    return row


def chunked_row(record_id: str, task: str, gens: list, parsed: list[Parsed], outcome: Parsed,
                conflicts: dict, adapter: str | None, own: int | None = None) -> dict:
    """A record's chunks (`backends.base.Generation`s, each judged) as one row whose prediction, status and
    error are `outcome`'s. Where chunk `own`'s outcome stands for the row (none had a scored prediction), `raw`
    and the finish reason are that chunk's, so that judging the row again gives the same answer."""
    if own is not None:
        raw, finish = writable_text(gens[own].text), gens[own].finish_reason
    else:
        raw = jsonutil.dumps(outcome.prediction)
        finish = "length" if any(g.finish_reason == "length" for g in gens) else "stop"
    return {"id": record_id, "task": task, "prediction": outcome.prediction, "status": outcome.status,
            "error": outcome.error, "raw": raw, "prompt_tokens": sum(g.prompt_tokens or 0 for g in gens),
            "output_tokens": sum(g.output_tokens or 0 for g in gens), "finish_reason": finish, "adapter": adapter,
            "chunks": len(gens), "chunk_statuses": [p.status for p in parsed],
            "chunk_errors": [p.error for p in parsed], "chunk_raw": [writable_text(g.text) for g in gens],
            "chunk_conflicts": conflicts}
