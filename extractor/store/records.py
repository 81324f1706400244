"""One source object (a JSON line, a Parquet or CSV row) checked as a record, for every reader (`CorpusReader`,
the Ray actors): a dict with `id` (str), `line` (1-based line or row number, for error messages), `values`
(the task's input fields) and `row` (the whole source object, for --keep-field). What is wrong with a bad one
is a `RecordProblem`; with its file and line, a `BadRecord`."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

from extractor import jsonutil

SEED_CONTEXT_FIELD = "context"  # the seed's {context, target} lines
_SKIP_HINT = "; fix the record or pass --on-bad-record skip to write bad records to a rejects file"


@dataclass
class BadRecord(Exception):
    """One bad input record: where it is and what is wrong."""

    source: str
    line: int
    reason: str
    raw: str = ""
    record_id: str | None = None

    def message(self) -> str:
        rid = f" (id {self.record_id})" if self.record_id is not None else ""
        return f"{self.source}:{self.line}{rid}: {self.reason}{_SKIP_HINT}"


class RecordProblem(ValueError):
    """What is wrong with one source object as a record (and its id, when it has a usable one)."""

    def __init__(self, reason: str, record_id: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.record_id = record_id


def id_key(record_id: str) -> int:
    """A 64-bit digest of an id: sets of these keep memory small for millions of ids."""
    return int.from_bytes(hashlib.blake2b(record_id.encode("utf-8"), digest_size=8).digest(), "little")


def seed_passage(context: str) -> str:
    """The passage inside a seed context `Instruction: …\\nInput: <question>\\n\\n<passage>\\nAnswer: `."""
    body = context.split("\nInput: ", 1)[-1]
    body = body.rsplit("\nAnswer:", 1)[0]
    return body.split("\n\n", 1)[1] if "\n\n" in body else body


def input_columns(input_fields, text_field: str | None = None) -> dict[str, str]:
    """Task input field -> corpus column: each its own name, except that --text-field renames the column
    feeding the first."""
    columns = {f: f for f in input_fields}
    if text_field:
        columns[list(input_fields)[0]] = text_field
    return columns


def check_record(row, field_map: dict, id_field: str = "id", line: int = 0, ids_required: bool = False) -> dict:
    """The record checks, for every reader (`CorpusReader`, the Ray actors): a source object -> a record
    {id, line, values, row}, or RecordProblem. `field_map` maps each task input field to its column; without
    an id field the id is the line number, unless `ids_required` (a Ray read, which sees no line numbers)."""
    if not isinstance(row, dict):
        raise RecordProblem(f"expected a JSON object, got {type(row).__name__}")
    record_id = _record_id(row, id_field, line, ids_required)
    values = {}
    for task_field, column in field_map.items():
        value = row.get(column)
        if value is None and column == "text" and SEED_CONTEXT_FIELD in row:
            value = _seed_text(row, record_id)
        if value is None:
            raise RecordProblem(f"missing field '{column}' (fields present: {', '.join(map(str, row)) or 'none'}); "
                                "choose one with --text-field", record_id)
        if not isinstance(value, str):
            raise RecordProblem(f"field '{column}' must be a string, got {type(value).__name__}", record_id)
        values[task_field] = value
    return {"id": record_id, "line": line, "values": values, "row": row}


def _record_id(row: dict, id_field: str, line: int, ids_required: bool) -> str:
    value = row.get(id_field)
    if value is None:
        if ids_required:
            raise RecordProblem(f"missing id field '{id_field}' (a Ray run needs ids in the data)")
        return str(line)  # deterministic: the 1-based line (or row) number
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise RecordProblem(f"id field '{id_field}' must be a string or integer, got {type(value).__name__}")
    return str(value)


def _seed_text(row: dict, record_id: str) -> str:
    context = row[SEED_CONTEXT_FIELD]
    if not isinstance(context, str):
        raise RecordProblem(f"field '{SEED_CONTEXT_FIELD}' must be a string", record_id)
    return seed_passage(context)


def raw_text(row) -> str:
    try:
        return jsonutil.dumps(row)
    except (TypeError, ValueError):
        return repr(row)
