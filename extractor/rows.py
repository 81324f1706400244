"""The output row: one per input record, whichever runner wrote it (`extractor run`, a `--gpus` worker, a Ray
actor). Its keys, and how a prediction row and an error row are built, are spelled here only.

A row: id, task, prediction (the parsed object or None), status (`outputs.STATUSES`), error, raw (the model's
text, kept so `eval --reparse` can judge it again), prompt_tokens, output_tokens, finish_reason, adapter, then
`spans` (where each extracted value is in the record's text, `scoring/grounding.py`; scored statuses of
tasks with text values only), then the `--keep-field` columns copied from the input record.
"""
from __future__ import annotations

from extractor.outputs import ERROR, Parsed, writable_text

ROW_KEYS = ("id", "task", "prediction", "status", "error", "raw", "prompt_tokens", "output_tokens",
            "finish_reason", "adapter")
RESERVED = frozenset((*ROW_KEYS, "spans"))  # what a --keep-field column may not be called


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
