"""`extractor data synth-jd` and `extractor data check`."""
from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import click
from extractor.cli.options import corpus_options, json_option
from extractor.cli.tables import console as make_console, rows_table
from extractor.store.column_stats import suggest_columns
from extractor.store.corpus import CorpusReader
from extractor.datasets.synth import write_corpus

MAX_LISTED = 20


@click.group()
def data():
    """Generate and check corpora.

    \b
    Examples:
      extractor data synth-jd --n 1000 --out corpus.jsonl --gold gold.jsonl
      extractor data check corpus.jsonl
    """


@data.command("synth-jd")
@click.option("--n", "n", type=click.IntRange(min=1), required=True, help="Number of postings.")
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="Corpus JSONL ({id, text} lines).")
@click.option("--gold", type=click.Path(dir_okay=False), default=None, help="Gold JSONL ({id, gold} lines).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--lang", type=click.Choice(["zh", "en", "mix"]), default="zh", show_default=True)
@click.option("--split", type=click.Choice(["in", "heldout", "all"]), default="in", show_default=True,
              help="Phrase templates and values: the training set, a disjoint held-out set, or both.")
@click.option("--prefix", default="jd", show_default=True, help="Id prefix.")
def synth_jd(n, out, gold, seed, lang, split, prefix):
    """Write a seeded synthetic job-posting corpus with gold jd_requirements labels.

    \b
    Example:
      extractor data synth-jd --n 1000000 --out corpus.jsonl --gold gold.jsonl --seed 1
    """
    start = time.perf_counter()
    count = write_corpus(Path(out), Path(gold) if gold else None, n, seed, lang, split, prefix)
    secs = time.perf_counter() - start
    click.echo(f"wrote {count} postings to {out}" + (f" and gold labels to {gold}" if gold else "")
               + f" in {secs:.1f}s")


@data.command("skillspan")
@click.argument("source", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="Corpus JSONL ({id, text}).")
@click.option("--gold", type=click.Path(dir_okay=False), required=True, help="Gold JSONL for the skills task.")
def skillspan(source, out, gold):
    """Convert SkillSpan BIO lines into a corpus and gold records for the `skills` task.

    \b
    Example:
      extractor data skillspan ../shared/data/skillspan/dev.json --out skills.jsonl --gold skills.gold.jsonl
    """
    from extractor.datasets.skillspan import convert
    count = convert(Path(source), Path(out), Path(gold))
    click.echo(f"wrote {count} sentences to {out} and gold spans to {gold}")


class _Collect:
    """A rejects sink for `check`: counts everything, keeps the first few for display. Records missing the
    text column are counted apart: one line says so, with the column that likely holds the text."""

    def __init__(self, text_col: str):
        self.items, self.count, self.duplicates = [], 0, 0
        self.missing_prefix = f"missing field '{text_col}'"
        self.missing_text, self.missing_lines = 0, []

    def write(self, bad):
        self.count += 1
        self.duplicates += bad.reason.startswith("duplicate id")
        if bad.reason.startswith(self.missing_prefix):
            self.missing_text += 1
            if len(self.missing_lines) < 5:
                self.missing_lines.append(bad.line)
        elif len(self.items) < MAX_LISTED:
            self.items.append(bad)


@data.command("check")
@click.argument("corpus", type=click.Path(dir_okay=False))
@corpus_options
@json_option("the result (records, fields, text lengths, bad records, suggested columns)")
def check(corpus, id_field, text_field, as_json):
    """Stream a corpus and report records, fields, text lengths and bad records (exit 2 if any). Where
    records lack the text field, one line names the column that likely holds the text.

    \b
    Examples:
      extractor data check dump.parquet --text-field description --id-field job_id
      extractor data check corpus.jsonl --json | jq .records
    """
    text_col = text_field or "text"
    sink = _Collect(text_col)
    reader = CorpusReader(corpus, id_field=id_field, text_field=text_field, on_bad="skip", rejects=sink)
    lengths = _Reservoir()
    for batch in reader:
        for rec in batch:
            lengths.add(len(next(iter(rec["values"].values()))))
    report = _report(reader, lengths, sink, text_col)
    if as_json:
        click.echo(json.dumps(report, ensure_ascii=False, indent=2))
    else:
        _print_report(make_console(), report)
    if sink.count:
        sys.exit(2)


class _Reservoir:
    """Min, max, mean exactly; percentiles from a fixed-size uniform sample (memory flat)."""

    def __init__(self, size=10_000, seed=0):
        self.size, self.rng, self.sample = size, random.Random(seed), []
        self.n, self.total, self.min, self.max = 0, 0, None, None

    def add(self, x):
        self.n += 1
        self.total += x
        self.min = x if self.min is None else min(self.min, x)
        self.max = x if self.max is None else max(self.max, x)
        if len(self.sample) < self.size:
            self.sample.append(x)
        else:
            j = self.rng.randrange(self.n)
            if j < self.size:
                self.sample[j] = x

    def pct(self, q):
        s = sorted(self.sample)
        return s[min(len(s) - 1, int(q * len(s)))] if s else 0


def _report(reader, lengths, sink, text_col) -> dict:
    """What `check` found, as the JSON `--json` prints (and the text report is made from)."""
    stats = reader.stats
    report = {"corpus": str(reader.path), "format": reader.format, "ok": sink.count == 0,
              "records": stats.records, "bad": sink.count, "duplicate_ids": sink.duplicates,
              "id_field": reader.id_field, "id_field_present": reader.id_field in stats.fields,
              "text_field": text_col, "fields": dict(sorted(stats.fields.items(), key=lambda kv: -kv[1])),
              "text_length": None, "missing_text_field": None,
              "bad_records": [{"source": b.source, "line": b.line, "id": b.record_id, "reason": b.reason}
                              for b in sink.items],
              "bad_not_listed": sink.count - sink.missing_text - len(sink.items)}
    if lengths.n:
        report["text_length"] = {"min": lengths.min, "mean": round(lengths.total / lengths.n, 1),
                                 "p50": lengths.pct(0.5), "p95": lengths.pct(0.95), "max": lengths.max}
    if sink.missing_text:
        text, id_col = suggest_columns(stats, exclude={reader.id_field})
        report["missing_text_field"] = {
            "records": sink.missing_text, "first_lines": sink.missing_lines, "suggested_text_field": text,
            "suggested_id_field": None if report["id_field_present"] else id_col}
    return report


def _print_report(console, report: dict) -> None:
    say = lambda text: console.print(text, markup=False, highlight=False)  # noqa: E731 - names are data
    say(f"{report['corpus']} ({report['format']})")
    say(f"records: {report['records']} good, {report['bad']} bad ({report['duplicate_ids']} duplicate ids)")
    say(f"id field: '{report['id_field']}'" + ("" if report["id_field_present"]
                                              else " (absent: ids are line numbers)"))
    say(f"text field: '{report['text_field']}'")
    console.print(rows_table(("field", "records with it"), report["fields"].items()))
    n = report["text_length"]
    if n:
        say(f"text length (chars): min {n['min']}, mean {n['mean']:.1f}, p50 {n['p50']}, p95 {n['p95']}, "
            f"max {n['max']}")
    if report["missing_text_field"]:
        click.echo("bad: " + _missing_text_line(report))
    for bad in report["bad_records"]:
        click.echo(f"bad: {bad['source']}:{bad['line']}: {bad['reason']}")
    if report["bad_not_listed"]:
        say(f"... and {report['bad_not_listed']} more bad records")


def _missing_text_line(report: dict) -> str:
    """One line for every record without the text field, with the columns to pass instead."""
    missing = report["missing_text_field"]
    lines = ", ".join(map(str, missing["first_lines"])) + (", …" if missing["records"] > 5 else "")
    where = f"{report['corpus']}: {missing['records']} records (lines {lines}) have no field " \
            f"'{report['text_field']}'"
    text, id_col = missing["suggested_text_field"], missing["suggested_id_field"]
    if text is None:
        return f"{where}; choose the column holding the text with --text-field (fields: " \
               f"{', '.join(map(str, report['fields'])) or 'none'})"
    flags = f"--text-field {text}" + (f" --id-field {id_col}" if id_col else "")
    return f"{where}; the likely text column is '{text}' (the longest strings on average): pass {flags}"
