"""What `extractor run` says: the settings it resolved (-v), each output's status table and rates at the end,
and the exit code: 130 when Ctrl-C stopped it (with how to resume), 1 when an output holds no usable result."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from extractor.cli.tables import status_table
from extractor.pipeline import RunOptions, Summary
from extractor.pipeline.config import RunConfig
from extractor.pipeline.summary import NoResultError


def say_settings(console, cfg: RunConfig, opts: RunOptions, outs: list) -> None:
    """-v: what the run resolved, before the backend loads."""
    limit = cfg.max_input_tokens or "the model's context - max new tokens"
    lines = [f"backend {cfg.backend}, model {cfg.model}" + (f", adapters {', '.join(cfg.adapters)}" if cfg.adapters
                                                             else ""),
             f"generation: {opts.params.as_dict()}",
             f"prompt limit: {limit} tokens, --on-long {opts.on_long}"
             + (f" (chunks of {opts.chunking.tokens or 'as many'} text tokens"
                + ("" if opts.chunking.tokens else " as fit") + f", overlap {opts.chunking.overlap})"
                if opts.chunking else "") + f"; window {cfg.window} records"
             + (f"; --limit {cfg.limit}" if cfg.limit else ""),
             f"corpus {opts.corpus} -> " + ", ".join(str(o) for o in outs)]
    for line in lines:
        console.print(line, markup=False, highlight=False, soft_wrap=True)


def finish(console, targets: list, summaries: list, cfg: RunConfig, check: bool = True) -> None:
    """Each output's summary; when Ctrl-C stopped them, one line on resuming and exit code 130; when an output
    holds no usable result, one line and exit code 1 (`check`: here, else once all outputs are done)."""
    for target, summary in zip(targets, summaries):
        report(console, target, summary)
    if any(summary.interrupted for summary in summaries):
        console.print("stopped early; rerun the same command with --resume to continue")
        raise SystemExit(130)
    if check:
        check_results(cfg, targets, [summary.statuses for summary in summaries])


def check_results(cfg: RunConfig, targets: list, statuses: list) -> None:
    """A complete run none of whose records came out ok or repaired is a failed job (exit 1), whatever
    wrote it: the reason and the counts in one line. A --gpus worker leaves this to its parent, which sees
    the merged output."""
    if cfg.allow_no_result or cfg.shard:
        return
    reasons = []
    for target, counts in zip(targets, statuses):
        reason = Summary(statuses=Counter(counts)).no_result()
        if reason:
            reasons.append(f"{target}: {reason}")
    if reasons:
        raise NoResultError("; ".join(reasons) + "; the output is complete — check the model, the prompt and "
                            "--max-new-tokens (--allow-no-result to accept it)")


def report(console, target: Path, summary: Summary) -> None:
    """One output's status table (with the long-input policy's marks) and its one line of counts and rates."""
    d = summary.as_dict()
    notes = {"input truncated (--on-long truncate)": d["input_truncated"]} if d["input_truncated"] else {}
    if "chunked" in d:
        c = d["chunked"]
        notes[f"split into chunks (--on-long chunk; {c['requests']} requests, {c['failed_chunks']} failed)"] = \
            c["records"]
    console.print(status_table(d["statuses"], notes or None))
    rate = f"{d['records_per_s']:.2f} rec/s, {d['output_tokens_per_s']:.1f} output tok/s" if d["records_per_s"] else "-"
    console.print(f"{target}: {d['records']} records ({d['new_this_run']} new, {d['already_done']} already done, "
                  f"{d['rejected_input']} rejected input) in {d['elapsed_s']:.1f}s — {rate}", highlight=False)
