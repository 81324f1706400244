"""`extractor bench`: the hf backend's fast path against plain `generate`, on this machine, with this model."""
from __future__ import annotations

import tempfile
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from extractor.cli.options import tasks_dir_option
from extractor.errors import InputError, ModelError
from extractor.store.provenance import check_writable, stamp, write_json_atomic


@click.command()
@click.option("--model", required=True, type=click.Path(file_okay=False),
              help="Local model folder (hf), or a hub id ORG/NAME[@revision] in the local Hugging Face cache.")
@click.option("--task", "task_name", default="jd_requirements", show_default=True)
@click.option("--corpus", type=click.Path(dir_okay=False), default=None,
              help="Records to run (JSONL/Parquet/CSV, the task's input fields). Default: synthetic postings.")
@click.option("--n", type=click.IntRange(min=1), default=512, show_default=True, help="Records on the fast path.")
@click.option("--baseline-n", type=click.IntRange(min=1), default=64, show_default=True,
              help="Records on the plain path (the first of the same records; it is the slow one).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=None, help="Default: the task's.")
@click.option("--constrained", is_flag=True, help="Both paths constrained to the task's JSON Schema.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Plain path: records per `generate` call (length-sorted); on CPU also the fast path's slots.")
@click.option("--dtype", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default="auto", show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Also write the figures as JSON here.")
@tasks_dir_option
def bench(model, task_name, corpus, n, baseline_n, max_new_tokens, constrained, batch_size, dtype, device, out,
          tasks_dirs):
    """Time `extractor run` on MODEL with the fast path and with plain `generate`, in one process.

    Both go through the run's own code path (prompts, parsing, validation and writing included), greedy,
    on the same records, each after an untimed warm-up. Prints output tokens/s, records/s, the ratio and
    how many outputs agree.

    \b
    Example:
      extractor bench --model ./model --n 1024 --baseline-n 128 --max-new-tokens 128 --out bench.json
    """
    from extractor.backends.hf import HFBackend
    from extractor.backends.model_files import check_model_dir
    from extractor.benchmark import FORMAT, compare_paths
    from extractor.datasets.synth import write_corpus
    from extractor.tasks.task import load_task
    task = load_task(task_name, tasks_dirs)
    if corpus is not None and not Path(corpus).is_file():
        raise InputError(f"{corpus}: no such file; check the corpus path or leave --corpus out for synthetic postings")
    if out:
        check_writable(Path(out))
    from extractor.hub import resolve
    model, _ = resolve(model)  # a hub id -> its cached snapshot
    check_model_dir(Path(model))
    why = _fast_refusal(model)
    if why:
        raise InputError(f"{model}: nothing to compare, the fast path does not take it ({why}); plain "
                         "`extractor run` is all it gets")

    def make_backend(fast: str) -> HFBackend:  # --fast is a knob of the backend's construction
        return HFBackend(model=model, dtype=dtype, device=device, batch_size=batch_size, fast=fast)
    new = max_new_tokens or task.spec.generation.max_new_tokens
    with tempfile.TemporaryDirectory(prefix="extractor-bench-") as tmp:
        work = Path(tmp)
        source = Path(corpus) if corpus else work / "postings.jsonl"
        if corpus is None:
            write_corpus(source, None, max(n, baseline_n), seed=0, lang="mix")
        figures = compare_paths(make_backend, task, source, work, n, min(baseline_n, n), new, constrained)
    result = {"format": FORMAT, "model": str(model), "task": task.name, "device": figures.pop("device"),
              "dtype": figures.pop("dtype"), "max_new_tokens": new,
              "constrained": constrained, "corpus": str(corpus) if corpus else "synthetic postings (seed 0)",
              **figures, **stamp()}
    _print(result)
    if out:
        write_json_atomic(Path(out), result)


def _fast_refusal(model: str) -> str | None:
    """Why the fast path would not take this model, from its config alone (no weights loaded)."""
    from types import SimpleNamespace

    from transformers import AutoConfig

    from extractor.backends.fast.families import refusal
    try:
        config = AutoConfig.from_pretrained(model)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"{model}: cannot read its config ({str(exc).splitlines()[0][:200]})") from None
    return refusal(SimpleNamespace(config=config))


def _print(r: dict) -> None:
    console = Console()
    table = Table(title=f"{r['task']} on {r['device']} ({r['dtype']}), {r['max_new_tokens']} new tokens"
                        + (", constrained" if r["constrained"] else ""))
    for col in ("path", "records", "tok/s", "records/s", "tokens/record", "warm-up s"):
        table.add_column(col, justify="left" if col == "path" else "right", no_wrap=True)
    for key, label in (("fast", "--fast on"), ("plain", "--fast off")):
        row = r[key]
        table.add_row(label, f"{row['records']:,}", f"{row['tok_s']:,.0f}", f"{row['records_s']:,.1f}",
                      f"{row['mean_output_tokens']:.1f}", f"{row['warmup_s']:.1f}")
    console.print(table)
    ratio = f"{r['ratio_tok_s']:.1f}x" if r["ratio_tok_s"] else "-"
    console.print(f"fast / plain: {ratio} output tok/s, {r['ratio_records_s']:.1f}x records/s; "
                  f"same raw output on {r['same_raw_output']} of {r['compared']} records", soft_wrap=True)
