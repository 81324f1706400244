"""How often `compare`'s gate flags equally good runs, and how often it catches a planted drop: simulation.

Gold: `jd_requirements` postings from `extractor.datasets.synth` (5 fields), or `spo` records generated here (1–3
triples each over the task's 44 predicates, drawn Zipf-like so a few predicates are common and most are rare,
as in DuIE). Predictions: each gold fact is kept, or with its class's error rate lost (FN) or given a wrong
value (FP + FN); now and then a spurious fact is added (FP). Two runs of equal quality draw independently
from the same rates; a planted drop raises one class's error rate in run B only.

Both runs are scored by the real scorer (`Evaluator`) and tested by the real gate (`compare_pair`,
`regressions`), so the figures are those of `extractor compare --fail-if-drop`. The CI test runs a few hundred
trials (tests/test_compare_calibration.py); bench/bench_compare_calibration.py runs the long version.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from extractor.scoring.compare import DROP, MICRO, CompareSettings, align, compare_pair, regressions
from extractor.scoring.evaluate import Evaluator
from extractor.scoring.join import GoldRecord, PredRecord
from extractor.datasets.synth import ABSENT, FIELDS, generate
from extractor.tasks.task import load_task

WRONG = "误"  # prefix of wrong values: never a gold value


@dataclass
class Scenario:
    """One simulated comparison: task, eval-set size, error rates, and an optional planted drop in B."""

    task: str
    n: int
    error_rate: float = 0.1
    spurious_rate: float = 0.02
    planted: str | None = None
    planted_rate: float = 0.0
    runs: int = 2  # more than two: a trend over equally good later runs (no planted drop)
    alpha: float = 0.05
    threshold: float = 0.0
    resamples: int = 1000


@dataclass
class Outcome:
    """What the gate said about one trial."""

    flagged: list[str]
    flagged_raw: list[str]  # columns whose own (unadjusted) p is below alpha: no family-wise control
    flagged_raw_half: list[str]  # ... below alpha/2: the earlier gate, with no family-wise control (two-sided p < alpha per column)
    tests: dict = field(repr=False)


def jd_gold(n: int, seed: int) -> list[tuple[str, list[tuple[str, str]]]]:
    """(id, facts) for n synthetic postings; facts are (field, value)."""
    return [(g["id"], [(f, v) for f in FIELDS for v in g["gold"][f] if v != ABSENT])
            for _, g in generate(n, seed=seed)]


def spo_gold(n: int, seed: int, predicates: list[str]) -> list[tuple[str, list[tuple[str, str]]]]:
    """(id, facts) for n records of 1–3 triples; facts are (predicate, "subject|object")."""
    rng = random.Random(f"spo:{seed}")
    ranked = predicates[:]
    rng.shuffle(ranked)
    weights = [1.0 / (rank + 1) for rank in range(len(ranked))]
    out = []
    for i in range(n):
        k = rng.choices((1, 2, 3), weights=(5, 3, 2))[0]
        facts = [(p, f"主体{i}_{j}|客体{i}_{j}") for j, p in enumerate(rng.choices(ranked, weights=weights, k=k))]
        out.append((f"spo-{i:06d}", facts))
    return out


def _as_object(task: str, facts: list[tuple[str, str]]):
    """Facts back into the task's output shape, so the real fact extractor reads them."""
    if task == "jd_requirements":
        return {f: [v for c, v in facts if c == f] or [ABSENT] for f in FIELDS}
    return [{"subject": key.split("|")[0], "predicate": cls, "object": key.split("|")[1],
             "subject_type": "实体", "object_type": "实体"} for cls, key in facts]


def perturb(facts: list, classes: list[str], rates: dict[str, float], spurious: float,
            rng: random.Random) -> list:
    """One run's prediction of a record: per fact kept, lost or wrong; maybe one spurious fact."""
    out = []
    for cls, key in facts:
        if rng.random() >= rates.get(cls, 0.0):
            out.append((cls, key))
        elif rng.random() < 0.5:
            out.append((cls, f"{WRONG}{rng.randrange(10**6)}|{WRONG}"))
    if rng.random() < spurious:
        out.append((rng.choice(classes), f"{WRONG}{rng.randrange(10**6)}|{WRONG}"))
    return out


class Simulator:
    """Gold for one task and size, reused across trials; each trial draws fresh predictions."""

    def __init__(self, task_name: str, n: int, seed: int = 0):
        self.task = load_task(task_name)
        if task_name == "jd_requirements":
            self.classes, self.gold = list(FIELDS), jd_gold(n, seed)
        elif task_name == "spo":
            self.classes = list(self.task.schema["items"]["properties"]["predicate"]["enum"])
            self.gold = spo_gold(n, seed, self.classes)
        else:
            raise ValueError(f"no simulator for task {task_name!r}; expected jd_requirements or spo")

    def run(self, rates: dict[str, float], spurious: float, rng: random.Random) -> list:
        """Evaluator.records of one simulated run."""
        ev = Evaluator(self.task, keep_records=True, examples=0)
        name = self.task.name
        for rid, facts in self.gold:
            pred = _as_object(name, perturb(facts, self.classes, rates, spurious, rng))
            ev.add(rid, PredRecord(rid, pred, "ok"), GoldRecord(rid, _as_object(name, facts)))
        return ev.records

    def support(self) -> dict[str, int]:
        """Gold facts per class."""
        counts = dict.fromkeys(self.classes, 0)
        for _, facts in self.gold:
            for cls, _ in facts:
                counts[cls] += 1
        return counts


def trial(sim: Simulator, sc: Scenario, seed: int) -> list[Outcome]:
    """One simulated baseline and its later runs through the gate; one Outcome per later run."""
    rng = random.Random(f"trial:{seed}")
    base_rates = dict.fromkeys(sim.classes, sc.error_rate)
    runs = [sim.run(base_rates, sc.spurious_rate, rng)]
    for _ in range(sc.runs - 1):
        rates = dict(base_rates)
        if sc.planted:
            rates[sc.planted] = sc.planted_rate
        runs.append(sim.run(rates, sc.spurious_rate, rng))
    aligned = align([(f"run{i}", r) for i, r in enumerate(runs)])
    settings = CompareSettings(sc.resamples, seed, sc.alpha, DROP, comparisons=sc.runs - 1)
    out = []
    for later in aligned[1:]:
        tests = compare_pair(aligned[0], later, settings)["tests"]
        raw = [c for c, t in tests.items() if t["delta"] < -sc.threshold and t["p_value"] < sc.alpha]
        half = [c for c in raw if tests[c]["p_value"] < sc.alpha / 2]
        out.append(Outcome(regressions(tests, sc.threshold, sc.alpha), raw, half, tests))
    return out


def false_flags(outcomes: list[Outcome], planted: str | None) -> list[str]:
    """Flags of one trial's runs on columns with no real drop (micro moves with a planted class)."""
    real = {planted, MICRO} if planted else set()
    return [c for o in outcomes for c in o.flagged if c not in real]
