"""`extractor demo`: the end-to-end demo on an embedded synthetic corpus (no GPU, no network)."""
from __future__ import annotations

from pathlib import Path

import click

from extractor import demo as _demo
from extractor.cli.main import cli
from extractor.demo import DemoConfig


@click.command()
@click.option("--out", default="demo-output", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the data, model, checkpoints, predictions and reports.")
@click.option("--train-n", type=int, default=20000, show_default=True, help="Training postings.")
@click.option("--max-steps", type=int, default=2500, show_default=True,
              help="Training step budget (about 160 s on 2 idle cores).")
@click.option("--max-seconds", type=float, default=600.0, show_default=True,
              help="Training time cap for a busy machine; the first budget spent ends training, and the learning "
                   "rate is annealed by it.")
@click.option("--target-f1", type=float, default=None,
              help="Also stop once dev micro F1 reaches this (default: use the whole budget).")
@click.option("--test-n", type=int, default=300, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def demo(out, train_n, max_steps, max_seconds, target_f1, test_n, seed):
    """Generate postings, train a small model, run it on the test and held-out splits, score both, HTML report.

    \b
    Example:
      extractor demo --out demo-output
    """
    run_demo(DemoConfig(out=Path(out), train_n=train_n, max_steps=max_steps, max_seconds=max_seconds,
                        target_f1=target_f1, test_n=test_n, seed=seed))


def invoke(args: list) -> None:
    """Run an extractor command in this process, exactly as from the shell."""
    try:
        cli.main([str(a) for a in args], prog_name="extractor", standalone_mode=False)
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise


def run_demo(cfg: DemoConfig) -> dict:
    """The demo (extractor/demo.py), its runs, evaluations and comparison through this CLI's own commands."""
    return _demo.run_demo(cfg, invoke)
