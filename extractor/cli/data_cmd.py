"""`extractor data synth-jd` and `extractor data check`."""
from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from extractor.cli.options import corpus_options
from extractor.corpus import CorpusReader
from extractor.synth import write_corpus

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
    from extractor.skillspan import convert
    count = convert(Path(source), Path(out), Path(gold))
    click.echo(f"wrote {count} sentences to {out} and gold spans to {gold}")


class _Collect:
    """A rejects sink for `check`: counts everything, keeps the first few for display."""

    def __init__(self):
        self.items, self.count, self.duplicates = [], 0, 0

    def write(self, bad):
        self.count += 1
        self.duplicates += bad.reason.startswith("duplicate id")
        if len(self.items) < MAX_LISTED:
            self.items.append(bad)


@data.command("check")
@click.argument("corpus", type=click.Path(dir_okay=False))
@corpus_options
def check(corpus, id_field, text_field):
    """Stream a corpus and report records, fields, text lengths and bad records (exit 2 if any).

    \b
    Example:
      extractor data check dump.parquet --text-field description --id-field job_id
    """
    sink = _Collect()
    reader = CorpusReader(corpus, id_field=id_field, text_field=text_field, on_bad="skip", rejects=sink)
    lengths = _Reservoir()
    for batch in reader:
        for rec in batch:
            lengths.add(len(next(iter(rec["values"].values()))))
    _print_report(Console(), reader, lengths, sink, text_field or "text")
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


def _print_report(console, reader, lengths, sink, text_col):
    stats = reader.stats
    console.print(f"[bold]{reader.path}[/bold] ({reader.format})")
    console.print(f"records: {stats.records} good, {sink.count} bad ({sink.duplicates} duplicate ids)")
    console.print(f"id field: '{reader.id_field}'" + ("" if reader.id_field in stats.fields
                                                      else " (absent: ids are line numbers)"))
    console.print(f"text field: '{text_col}'")
    table = Table("field", "records with it")
    for name, count in sorted(stats.fields.items(), key=lambda kv: -kv[1]):
        table.add_row(str(name), str(count))
    console.print(table)
    if lengths.n:
        console.print(f"text length (chars): min {lengths.min}, mean {lengths.total / lengths.n:.1f}, "
                      f"p50 {lengths.pct(0.5)}, p95 {lengths.pct(0.95)}, max {lengths.max}")
    for bad in sink.items:
        click.echo(f"bad: {bad.source}:{bad.line}: {bad.reason}")
    if sink.count > len(sink.items):
        console.print(f"... and {sink.count - len(sink.items)} more bad records")
