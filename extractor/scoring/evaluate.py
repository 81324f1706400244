"""Join predictions with gold by id and count TP/FP/FN per class, streaming.

Predictions and gold are read in lockstep: when both files list ids in the same order (the usual case,
e.g. `run` output against the generator's gold) nothing is buffered and memory stays flat; ids out of
order are matched through small pending maps. Gold records without a prediction are all false negatives
(status `missing`); predictions whose id is not in gold are counted and listed, not scored.
A prediction the scoring kind cannot read (a number, a string, a list or null where it expects an object,
with status ok or repaired) is counted under status `malformed` and scores as empty, like any failed output;
a gold record of that kind is counted under `malformed_gold` and left out of the scores (there is nothing
to score against). Both are listed by id.

Grounding (`grounding.py`, `grounded_rate.py`): each scored prediction's values are looked for in its
record's text — the corpus's (`corpus`), the row's kept `text`, or the gold's — or, with no text, taken from
the row's `spans`. Without gold (`gold_path` None) only the grounded rate and the statuses are reported.

For error analysis (`analysis.py`): each record's errors with wrong values paired as (predicted, expected),
a bounded number of such records per class with their text and the values located in it; the records whose
output failed, per status, with their raw text; a confusion matrix per enum or boolean field.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from extractor.store.records import id_key, seed_passage
from extractor.errors import InputError
from extractor.results.judge import SCORED_STATUSES, STATUSES, Validator, judge, parse_json
from extractor.scoring.analysis import ErrorRecords, FailedRecords, FieldConfusion, categorical_fields, pair_errors
from extractor.scoring.facts import FactExtractor, is_text, key_text
from extractor.scoring.grounded_rate import GroundedRate
from extractor.scoring.alignment import Span
from extractor.scoring.grounding import Grounder, check_spans
from extractor.scoring.metrics import Counts, averages, prf_f1
from extractor.scoring.normalize import tokens
from extractor.store.writers import iter_rows

MISSING = "missing"
MALFORMED, MALFORMED_GOLD = "malformed", "malformed_gold"
MAX_LISTED_IDS = 100
SNIPPET_CHARS = 160
CONTEXT_CHARS = 60  # text kept before a highlighted span
MAX_SPAN_CHARS = 400


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


def overlap_f1(a: str, b: str) -> float:
    """Token-overlap F1 between two strings (bag of tokens)."""
    ta, tb = Counter(tokens(a)), Counter(tokens(b))
    common = sum((ta & tb).values())
    if not common:
        return 0.0
    return prf_f1(common / sum(ta.values()), common / sum(tb.values()))


@dataclass
class Lenient:
    """Soft precision/recall: each fact earns its best token-overlap F1 against the other side."""

    soft_p: float = 0.0
    soft_r: float = 0.0
    n_pred: int = 0
    n_gold: int = 0

    def as_dict(self) -> dict:
        p = self.soft_p / self.n_pred if self.n_pred else 0.0
        r = self.soft_r / self.n_gold if self.n_gold else 0.0
        return {"precision": p, "recall": r, "f1": prf_f1(p, r)}


@dataclass
class Examples:
    """Most frequent false positives / negatives of one class, with one record id and snippet each."""

    counts: Counter = field(default_factory=Counter)
    where: dict = field(default_factory=dict)
    limit: int = 20_000  # distinct keys tracked per class, so memory stays bounded

    def add(self, key: str, rid: str, text: str | None, locate=None) -> None:
        """locate(): the spans of this key in text, asked only the first time a key is seen."""
        if key in self.counts or len(self.counts) < self.limit:
            self.counts[key] += 1
            if key not in self.where:
                self.where[key] = (rid, *snippet(text or "", locate() if locate and text else []))

    def top(self, k: int) -> list[dict]:
        return [{"key": key, "count": n, "id": self.where[key][0], "snippet": self.where[key][1],
                 "snippet_start": self.where[key][2], "highlights": self.where[key][3]}
                for key, n in self.counts.most_common(k)]


class PairExamples(Examples):
    """Most frequent wrong values of one class: (predicted, expected) as display texts, one record each."""

    def top(self, k: int) -> list[dict]:
        out = super().top(k)
        for x in out:
            x["predicted"], x["expected"] = x.pop("key")
        return out


def snippet(text: str, spans: list[Span]) -> tuple[str, int, list[dict]]:
    """A window of text around the first span (its start, else the text's head), and the spans inside it
    as offsets into the window."""
    if not spans:
        return text[:SNIPPET_CHARS], 0, []
    first = spans[0]
    start = max(0, first.start - CONTEXT_CHARS)
    end = min(len(text), max(start + SNIPPET_CHARS, min(first.end, first.start + MAX_SPAN_CHARS) + CONTEXT_CHARS))
    marks = [{"start": s.start - start, "end": min(s.end, end) - start, "match": s.match}
             for s in spans if s.start >= start and s.start < end]
    return text[start:end], start, marks


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
            self._soft_overlap(fps, fns)
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

    def _soft_overlap(self, fps: set, fns: set) -> None:
        """Partial credit of unmatched facts: best token overlap with an unmatched fact of the same class.
        Text only: a number or boolean is right or wrong (2021 and 2012 share no credit)."""
        fps = {(c, k) for c, k in fps if is_text(k)}
        fns = {(c, k) for c, k in fns if is_text(k)}
        for cls, key in fps:
            best = max((overlap_f1(key_text(key), key_text(g)) for c, g in fns if c == cls), default=0.0)
            self.lenient.setdefault(cls, Lenient()).soft_p += best
        for cls, key in fns:
            best = max((overlap_f1(key_text(key), key_text(p)) for c, p in fps if c == cls), default=0.0)
            self.lenient.setdefault(cls, Lenient()).soft_r += best

    def _lenient_result(self) -> dict:
        """Exact matches count 1; unmatched facts add their soft overlap credit."""
        total, classes = Lenient(), {}
        for cls, c in sorted(self.per_class.items()):
            extra = self.lenient.get(cls, Lenient())
            entry = Lenient(c.tp + extra.soft_p, c.tp + extra.soft_r, c.tp + c.fp, c.tp + c.fn)
            classes[cls] = entry.as_dict()
            total.soft_p += entry.soft_p
            total.soft_r += entry.soft_r
            total.n_pred += entry.n_pred
            total.n_gold += entry.n_gold
        return {"micro": total.as_dict(), "classes": classes}

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
            "lenient": self._lenient_result(),
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
