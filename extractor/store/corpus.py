"""Stream corpora of any size (JSONL, JSONL.gz, Parquet, CSV) as batches of checked records, memory flat.

Local paths and object-store URIs (`locations.py`) alike: a URI streams through its filesystem in blocks.
The format's reader (`corpus_formats.py`) yields source objects; each is checked as a record
(`records.py`). Bad records fail fast with file:line, or with on_bad="skip" go to a rejects file
(`rejects.py`) with the reason; they are never silently dropped.
"""
from __future__ import annotations

from collections.abc import Iterator

from extractor.errors import InputError
from extractor.store import locations
from extractor.store.column_stats import ReadStats
from extractor.store.corpus_formats import iter_jsonl, iter_table
from extractor.store.corpus_path import check_corpus
from extractor.store.records import BadRecord, RecordProblem, check_record, id_key, input_columns, raw_text
from extractor.store.rejects import RejectsWriter

DEFAULT_BATCH = 4096


class CorpusReader:
    """Iterates batches of records from one corpus file, checking every record."""

    def __init__(self, path: str | locations.Location, input_fields=("text",), id_field: str = "id",
                 text_field: str | None = None, on_bad: str = "fail", rejects: RejectsWriter | None = None,
                 batch_size: int = DEFAULT_BATCH, check_duplicates: bool = True):
        self.path = locations.target(path)
        self.format = check_corpus(self.path)
        self.input_fields = list(input_fields)
        self.field_map = input_columns(self.input_fields, text_field)
        self.id_field = id_field
        self.on_bad = on_bad
        self.rejects = rejects
        self.batch_size = batch_size
        self.check_duplicates = check_duplicates
        self.stats = ReadStats()
        self._seen: set[int] = set()

    def __iter__(self) -> Iterator[list[dict]]:
        batch = []
        for item in self._rows():
            record = self._to_record(item)
            if record is None:
                continue
            batch.append(record)
            if len(batch) >= self.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def _to_record(self, item) -> dict | None:
        try:
            if isinstance(item, BadRecord):
                raise item
            line, row = item
            return self._check(line, row)
        except BadRecord as bad:
            self._reject(bad)
            return None

    def _reject(self, bad: BadRecord) -> None:
        if self.on_bad != "skip":
            raise InputError(bad.message())
        self.stats.rejected += 1
        if self.rejects is not None:
            self.rejects.write(bad)

    def _check(self, line: int, row) -> dict:
        src = str(self.path)
        if isinstance(row, dict):
            self.stats.count_row(row)
        try:
            record = check_record(row, self.field_map, self.id_field, line)
        except RecordProblem as problem:
            raise BadRecord(src, line, problem.reason, raw_text(row), problem.record_id) from None
        if self.check_duplicates:
            key = id_key(record["id"])
            if key in self._seen:
                raise BadRecord(src, line, f"duplicate id '{record['id']}'; ids must be unique "
                                "(or drop the id field to number records by line)", raw_text(row), record["id"])
            self._seen.add(key)
        self.stats.records += 1
        return record

    def _rows(self):
        if self.format == "jsonl":
            yield from iter_jsonl(self.path)
        elif self.format == "parquet":
            yield from iter_table(self.path, "parquet", first_line=1)
        else:
            yield from iter_table(self.path, "csv", first_line=2)  # line 1 is the header
