"""Model output -> output rows for one output: each generation judged against the task's schema (a chunked
record's chunks judged one by one, the scored ones merged and the merge judged), its values grounded in the
record's text, the run's --keep-field columns copied. Runs on the writer thread, off the generating one."""
from __future__ import annotations

from extractor.backends.base import Generation
from extractor.pipeline.merge import Merger
from extractor.pipeline.options import RunOptions
from extractor.pipeline.renderer import TRUNCATED_AT
from extractor.results.judge import ERROR, REPAIRED, SCHEMA_VIOLATION, SCORED_STATUSES, OK, Parsed, Validator, judge
from extractor.results.rows import chunked_row, error_row, keep_fields, prediction_row
from extractor.scoring.grounding import Grounder

# The row field that flags a record whose text --on-long truncate cut to fit the limit (absent otherwise).
INPUT_TRUNCATED = "input_truncated"


class RowJudge:
    """Rows of one output: `limit` is the prompt limit its records were rendered under (a record cut to it is
    flagged), `label` the adapter label its rows carry (None: none)."""

    def __init__(self, task, opts: RunOptions, limit: int | None, label: str | None = None):
        self.task, self.opts, self.limit, self.label = task, opts, limit, label
        self.validator = Validator(task.schema, task.registry)
        self.grounder = Grounder(task)  # each row's `spans`: where its values are in the record's text
        self.merger = Merger(task)

    def rows(self, triples) -> list[dict]:
        """(record, generation, skip reason) triples -> rows, in the same order. A chunked record's generation
        is the list of its chunks'."""
        return [self._row(rec, gen, skip) for rec, gen, skip in triples]

    def _row(self, rec: dict, gen, skip_reason: str | None) -> dict:
        if isinstance(gen, list):
            row = self._chunked_row(rec, gen)
        elif gen is None or gen.error:
            row = error_row(rec["id"], self.task.name, skip_reason or gen.error, self.label,
                            gen.prompt_tokens if gen else None)
        else:
            row = prediction_row(rec["id"], self.task.name, gen, judge(gen.text, gen.finish_reason, self.validator),
                                 self.label)
        if self.grounder.active and row["status"] in SCORED_STATUSES:
            row["spans"] = self.grounder.ground(rec["values"][self.task.spec.input_fields[0]], row["prediction"])
        if self.limit in rec.get(TRUNCATED_AT, ()):
            row[INPUT_TRUNCATED] = True
        return keep_fields(row, rec["row"], self.opts.keep_fields)

    def _chunked_row(self, rec: dict, gens: list[Generation]) -> dict:
        """One row from a record's chunks: each judged, the scored ones merged (merge.py) and the merge judged
        against the schema; where no chunk has a scored prediction, the first chunk's outcome is the row's."""
        parsed = [Parsed(None, ERROR, g.error) if g.error else judge(g.text, g.finish_reason, self.validator)
                  for g in gens]
        scored = [p for p in parsed if p.status in SCORED_STATUSES]
        if not scored:
            first = parsed[0]
            outcome = Parsed(first.prediction, first.status, f"chunk 1 of {len(gens)}: {first.error}")
            return chunked_row(rec["id"], self.task.name, gens, parsed, outcome, {}, self.label, own=0)
        merged, conflicts = self.merger.merge([p.prediction for p in scored])
        error = self.validator.first_error(merged)
        if error is not None:
            outcome = Parsed(merged, SCHEMA_VIOLATION, f"the merged chunks' prediction: {error}")
        else:
            outcome = Parsed(merged, REPAIRED if any(p.status == REPAIRED for p in scored) else OK)
        return chunked_row(rec["id"], self.task.name, gens, parsed, outcome, conflicts, self.label)
