"""Count TP/FP/FN per class over predictions joined with gold by id (`join.py`), and assemble the metrics.

Gold records without a prediction are all false negatives (status `missing`); predictions whose id is not in
gold are counted and listed, not scored.
A prediction the scoring kind cannot read (a number, a string, a list or null where it expects an object,
with status ok or repaired) is counted under status `malformed` and scores as empty, like any failed output;
a gold record of that kind is counted under `malformed_gold` and left out of the scores (there is nothing
to score against). Both are listed by id.

Grounding (`grounding.py`, `grounded_rate.py`): each scored prediction's values are looked for in its
record's text — the corpus's (`corpus`), the row's kept `text`, or the gold's — or, with no text, taken from
the row's `spans`. Without gold (`gold_path` None) only the grounded rate and the statuses are reported.

For error analysis (`analysis.py`, `examples.py`): each record's errors with wrong values paired as
(predicted, expected), a bounded number of such records per class with their text and the values located in
it; the records whose output failed, per status, with their raw text; a confusion matrix per enum or boolean
field. Lenient token-overlap scores: `lenient.py`.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from extractor.results.judge import SCORED_STATUSES
from extractor.scoring.analysis import ErrorRecords, FailedRecords, FieldConfusion, categorical_fields, pair_errors
from extractor.scoring.examples import Examples, PairExamples
from extractor.scoring.facts import FactExtractor, key_text
from extractor.scoring.grounded_rate import GroundedRate
from extractor.scoring.grounding import Grounder
from extractor.scoring.join import CorpusJoin, GoldRecord, PredRecord, iter_gold, iter_predictions, join, with_corpus_text
from extractor.scoring.lenient import Lenient, add_soft_overlap, lenient_result, overlap_f1
from extractor.scoring.metrics import Counts, averages
from extractor.tasks.validation import Validator

MISSING = "missing"
MALFORMED, MALFORMED_GOLD = "malformed", "malformed_gold"
MAX_LISTED_IDS = 100


class Evaluator:
    """Accumulates counts for one task over joined records."""

    def __init__(self, task, keep_records: bool = False, examples: int = 5):
        self.task = task
        self.facts = FactExtractor(task)
        self.grounder = Grounder(task)
        self.grounding = GroundedRate(examples, keep_records)
        self.n_predictions = 0  # without gold: predictions read
        self.per_class: dict[str, Counts] = {}
        self.lenient: dict[str, Lenient] = {}
        self.status_counts: Counter = Counter()
        self.fp_examples: dict[str, Examples] = {}
        self.fn_examples: dict[str, Examples] = {}
        self.n_examples = examples
        self.missing_ids: list[str] = []
        self.extra_ids: list[str] = []
        self.malformed_ids: dict[str, list[str]] = {MALFORMED: [], MALFORMED_GOLD: []}
        self.n_missing = self.n_extra = self.n_scored = self.n_gold = 0
        self.keep_records = keep_records
        self.records: list[tuple[str, dict[str, tuple[int, int, int]]]] = []
        self.single_label = task.spec.scoring.kind == "labels"
        self.confusion: Counter = Counter()
        self.pair_examples: dict[str, PairExamples] = {}
        self.error_records = ErrorRecords()
        self.failed = FailedRecords()
        self.field_confusion = FieldConfusion(categorical_fields(task, self.facts.norm))

    def add(self, rid: str, pred: PredRecord | None, gold: GoldRecord | None) -> None:
        if gold is None:
            self.n_extra += 1
            if len(self.extra_ids) < MAX_LISTED_IDS:
                self.extra_ids.append(rid)
            return
        self.n_gold += 1
        if self.facts.malformed(gold.obj):
            self._count_status(MALFORMED_GOLD, rid)
            return
        self.n_scored += 1
        if pred is None:
            status = MISSING
            self.n_missing += 1
            if len(self.missing_ids) < MAX_LISTED_IDS:
                self.missing_ids.append(rid)
        elif pred.status in SCORED_STATUSES and self.facts.malformed(pred.obj):
            status = MALFORMED
        else:
            status = pred.status
        self._count_status(status, rid, pred)
        pred_facts = self.facts(pred.obj) if status in SCORED_STATUSES else set()
        gold_facts = self.facts(gold.obj)
        text = (pred.text if pred else None) or gold.text
        self._count(rid, pred_facts, gold_facts, text, status, pred.error if pred else None)
        self.field_confusion.add(rid, pred_facts, gold_facts)
        summary = self._ground(rid, pred, text) if status in SCORED_STATUSES else None
        if summary is not None:
            grounded = self.grounder.grounded_facts(pred_facts, summary)
            self.grounding.split(pred_facts & gold_facts, pred_facts - gold_facts, grounded)

    def add_prediction(self, rid: str, pred: PredRecord) -> None:
        """Without gold: a prediction's status and grounding only."""
        self.n_predictions += 1
        if self.keep_records:
            self.records.append((rid, {}))  # no F1 counts: the ids, for compare's coverage and alignment
        status = pred.status
        if status in SCORED_STATUSES and self.facts.malformed(pred.obj):
            status = MALFORMED
        self._count_status(status, rid, pred)
        if status in SCORED_STATUSES:
            self._ground(rid, pred, pred.text)

    def _ground(self, rid: str, pred: PredRecord, text: str | None):
        """The record's grounding summary, counted; None when there is nothing to ground or nothing to ground
        it against."""
        if not self.grounder.active:
            return None
        if isinstance(text, str):
            spans = self.grounder.ground(text, pred.obj)
        elif pred.spans is not None:
            spans = self.grounder.from_spans(pred.obj, pred.spans)
        else:
            if next(self.grounder.values(pred.obj), None) is not None:
                self.grounding.no_text(rid)
            return None
        summary, written = self.grounder.summarize(spans)
        self.grounding.add(rid, summary, written)
        return summary

    def _count_status(self, status: str, rid: str, pred: PredRecord | None = None) -> None:
        self.status_counts[status] += 1
        listed = self.malformed_ids.get(status)
        if listed is not None and len(listed) < MAX_LISTED_IDS:
            listed.append(rid)
        if pred is not None and status not in SCORED_STATUSES:
            error = pred.error
            if status == MALFORMED:
                error = f"the prediction is no output the scoring kind '{self.facts.kind}' can read; scored as empty"
            self.failed.add(rid, status, pred.raw, error, pred.obj)

    def _count(self, rid: str, pred: set, gold: set, text: str | None, status: str = "ok",
               error: str | None = None) -> None:
        per_record: dict[str, list[int]] = {}
        for cls, _ in pred & gold:
            per_record.setdefault(cls, [0, 0, 0])[0] += 1
        fps, fns = pred - gold, gold - pred
        for fact in fps:
            per_record.setdefault(fact[0], [0, 0, 0])[1] += 1
        for fact in fns:
            per_record.setdefault(fact[0], [0, 0, 0])[2] += 1
        failed = status not in SCORED_STATUSES
        if fps or fns or failed:
            self._errors(rid, fps, fns, text, status if failed else None, error)
        for cls, (tp, fp, fn) in per_record.items():
            c = self.per_class.get(cls)
            if c is None:
                c = self.per_class[cls] = Counts()
            c.tp += tp
            c.fp += fp
            c.fn += fn
        if fps and fns:
            add_soft_overlap(self.lenient, fps, fns)
        if self.single_label:
            self._confuse(pred, gold)
        if self.keep_records:
            self.records.append((rid, {c: tuple(v) for c, v in per_record.items()}))

    def _errors(self, rid: str, fps: set, fns: set, text: str | None, failed: str | None,
                error: str | None) -> None:
        """A record's errors: wrong values paired, the rest plain; counted for the class lists, and the
        record kept with its text while its classes (or its failed status) have room."""
        items = pair_errors(fps, fns, overlap_f1)
        for item in items:
            if item.kind == "wrong":
                facts = ((item.cls, item.predicted), (item.cls, item.expected))
                self.pair_examples.setdefault(item.cls, PairExamples()).add(
                    (key_text(item.predicted), key_text(item.expected)), rid, text, self._locator(facts, text))
            else:
                fact = (item.cls, item.predicted if item.kind == "fp" else item.expected)
                examples = self.fp_examples if item.kind == "fp" else self.fn_examples
                examples.setdefault(item.cls, Examples()).add(key_text(fact[1]), rid, text,
                                                              self._locator((fact,), text))
        if self.error_records.wants({i.cls for i in items}, failed):
            self.error_records.add(rid, failed or "ok", error if failed else None, items, text,
                                   self.grounder.locate_fact)

    def _locator(self, facts, text: str | None):
        return lambda: sorted(s for fact in facts for s in self.grounder.locate_fact(fact, text))

    def _confuse(self, pred: set, gold: set) -> None:
        if len(pred) <= 1 and len(gold) <= 1:
            p = next(iter(pred))[0] if pred else "(none)"
            g = next(iter(gold))[0] if gold else "(none)"
            self.confusion[(g, p)] += 1
        else:
            self.single_label = False  # a multi-label record: no confusion matrix

    def result(self) -> dict:
        if self.n_gold == 0 and self.n_predictions:
            return self._gold_free_result()
        out = self._scores()
        if self.grounding.records_grounded or self.grounding.records_without_text:
            out["grounding"] = self.grounding.result()
        return out

    def _gold_free_result(self) -> dict:
        return {"records": {"predictions": self.n_predictions, "malformed": self.status_counts[MALFORMED]},
                "status_counts": dict(sorted(self.status_counts.items())),
                "malformed_ids": self.malformed_ids[MALFORMED], "failed": self.failed.result(),
                "grounding": self.grounding.result()}

    def _scores(self) -> dict:
        classes = {cls: c.as_dict() for cls, c in sorted(self.per_class.items())}
        out = {
            "records": {"gold": self.n_gold, "scored": self.n_scored, "missing": self.n_missing,
                        "extra_predictions": self.n_extra, "malformed": self.status_counts[MALFORMED],
                        "malformed_gold": self.status_counts[MALFORMED_GOLD]},
            "status_counts": dict(sorted(self.status_counts.items())),
            "missing_ids": self.missing_ids, "extra_ids": self.extra_ids,
            "malformed_ids": self.malformed_ids[MALFORMED], "malformed_gold_ids": self.malformed_ids[MALFORMED_GOLD],
            "classes": classes, **averages(self.per_class),
            "lenient": lenient_result(self.per_class, self.lenient),
            "examples": {cls: {"wrong_values": self.pair_examples.get(cls, PairExamples()).top(self.n_examples),
                               "false_positives": self.fp_examples.get(cls, Examples()).top(self.n_examples),
                               "false_negatives": self.fn_examples.get(cls, Examples()).top(self.n_examples)}
                         for cls in classes},
            "errors": self.error_records.result(),
            "failed": self.failed.result(),
            "confusion_fields": self.field_confusion.result(),
        }
        if self.single_label and self.confusion:
            out["confusion"] = [{"gold": g, "pred": p, "count": n} for (g, p), n in sorted(self.confusion.items())]
        return out


def evaluate(task, pred_path: Path, gold_path: Path | None, reparse: bool = False, keep_records: bool = False,
             examples: int = 5, corpus=None, corpus_join: CorpusJoin | None = None) -> Evaluator:
    """Score predictions against gold, or (gold_path None) only ground them. corpus: a `CorpusReader` giving
    each record's text; corpus_join collects how the two met."""
    validator = Validator(task.schema, task.registry) if reparse else None
    ev = Evaluator(task, keep_records=keep_records, examples=examples)
    preds = iter_predictions(pred_path, validator)
    if corpus is not None:
        preds = with_corpus_text(preds, corpus, pred_path, corpus_join or CorpusJoin(), task.spec.input_fields[0])
    if gold_path is None:
        for pred in preds:
            ev.add_prediction(pred.id, pred)
        return ev
    for rid, pred, gold in join(preds, iter_gold(gold_path), pred_path, gold_path):
        ev.add(rid, pred, gold)
    return ev
