"""How `extractor run` drives its outputs, once the checks have passed: one backend for one output or one per
adapter (in one pass where the backend decodes adapters together, else one after another), several full
checkpoints swapped into one backend (one output each), --gpus worker processes (shards merged in input
order), or Ray Data (`runners/ray_runner.py`). Every mode that reads the corpus itself fills its outputs
through `OnePass`; each output's rows, manifest and summary are the same whichever mode wrote them."""
from __future__ import annotations

from pathlib import Path

import click

from extractor.backends.readahead import read_ahead
from extractor.cli.run_checks import preflight
from extractor.cli.run_outputs import (adapter_lane, checkpoint_labels, locked_files, output_key,
                                       refuse_overwriting_inputs)
from extractor.cli.run_report import check_results, finish
from extractor.errors import InputError
from extractor.hub import RunSources
from extractor.pipeline import Lane, OnePass, RunOptions, Summary, output_for_adapter
from extractor.pipeline.claim import Claim
from extractor.pipeline.config import RunConfig
from extractor.plugins import backend_class
from extractor.store import locations
from extractor.store.provenance import check_writable


def run_adapters(cfg: RunConfig, task, opts: RunOptions, sources: RunSources, console) -> None:
    """One backend; one output per adapter (one, without adapters): in one pass where the backend decodes
    the adapters together, else one run after another."""
    engine = backend_class(cfg.backend)(**cfg.backend_kwargs(sources.model, sources.adapters))
    total = expect(engine, opts)
    names = engine.adapters()
    if len(names) > 1 and engine.decodes_together(names, opts.params):
        lanes = [adapter_lane(task, engine, opts, sources, name) for name in names]
        outs = [output_for_adapter(opts.out, lane.judge.label, len(names)) for lane in lanes]
        finish(console, outs, fill(task, engine, lanes, opts, outs, sources, console, total), cfg)
        return
    targets, summaries = [], []
    for name in names:  # one run per adapter, one after another: this backend cannot decode them together
        lane = adapter_lane(task, engine, opts, sources, name)
        out = output_for_adapter(opts.out, lane.judge.label, len(names))
        targets.append(out)
        summaries += fill(task, engine, [lane], opts, [out], sources, console, total)
        finish(console, [out], summaries[-1:], cfg, check=False)
    check_results(cfg, targets, [summary.statuses for summary in summaries])


def run_checkpoints(cfg: RunConfig, task, checkpoints: list[RunSources], corpus, out, console) -> None:
    """Each checkpoint's weights into the same loaded model in turn, each its own output, exactly as one
    command per checkpoint would write them."""
    from extractor.backends.checkpoint_swap import check_swappable
    for later in checkpoints[1:]:  # before anything loads, not after the first checkpoint's whole run
        check_swappable(Path(checkpoints[0].model), Path(later.model))
    labels = checkpoint_labels([c.model for c in checkpoints])
    outs = [output_for_adapter(out, label, len(labels)) for label in labels]
    for sources in checkpoints:
        refuse_overwriting_inputs(cfg, sources, corpus, outs, task)
    opts = cfg.run_options(task)
    check_writable(opts.out)
    with Claim(outs, locked_files(cfg, outs)):
        preflight(cfg, task, opts, checkpoints[0], outs)
        engine = backend_class(cfg.backend)(**cfg.backend_kwargs(checkpoints[0].model, ()))
        total = expect(engine, opts)
        summaries: list[Summary] = []
        for i, (sources, target) in enumerate(zip(checkpoints, outs)):
            if i:
                engine.use_checkpoint(Path(sources.model))
            lane = Lane.build(task, engine, opts)
            if i + 1 < len(checkpoints):  # the next checkpoint's weights into memory while this one runs
                read_ahead(checkpoints[i + 1].model)
            summaries += fill(task, engine, [lane], opts, [target], sources, console, total)
            finish(console, [target], summaries[-1:], cfg, check=False)
        check_results(cfg, outs, [summary.statuses for summary in summaries])


def run_sharded(cfg: RunConfig, out, console, labels) -> None:
    """--gpus N: N worker processes of this command, one shard each, merged in input order."""
    from extractor.runners.shards import outputs, run_sharded as run_workers
    ctx = click.get_current_context()
    targets = [target for target, _ in outputs(out, cfg.gpus, labels)]
    check_writable(out)
    with Claim([], locked_files(cfg, targets)):
        if cfg.rejects and cfg.on_bad_record == "skip" and not (cfg.overwrite or cfg.resume) \
                and locations.exists(locations.target(cfg.rejects)):
            raise InputError(f"--rejects {cfg.rejects} already exists; pass --overwrite to replace it or choose "
                             "another --rejects")
        merged = run_workers(ctx.command, ctx.params, out, cfg.gpus, cfg.device, console, labels)
        check_results(cfg, [target for target, _ in merged], [statuses for _, statuses in merged])


def run_on_ray(cfg: RunConfig, task, opts: RunOptions, sources: RunSources, console) -> None:
    """--ray: the records through a Ray Data actor pool; this process writes the output."""
    from extractor.runners.ray_runner import DriverView, RayRun, check_ray_installed
    check_ray_installed()
    if len(sources.adapters) > 1:
        raise InputError("--ray runs one adapter at a time; start one run per adapter")
    adapter = sources.adapters[0] if sources.adapters else None
    view = DriverView(cfg.backend, sources.model, adapter, cfg.dtype, cfg.trust_remote_code)
    label = sources.adapter_labels.get(Path(adapter).name, Path(adapter).name) if adapter else None
    lane = Lane.build(task, view, opts, None, label)  # the workers' backends hold the one adapter
    job = RayRun(task, view, lane, opts, console, cfg, sources)
    finish(console, [job.out], [job.execute(job.prepare(output_key(task, view, lane, opts, sources)))], cfg)


def fill(task, engine, lanes: list[Lane], opts: RunOptions, outs: list, sources: RunSources, console,
         total: int | None) -> list[Summary]:
    """The outputs of `lanes`, filled by one read of the corpus: each manifest checked or written first."""
    job = OnePass(task, engine, lanes, opts, outs, console, total)
    return job.execute(job.prepare([output_key(task, engine, lane, opts, sources) for lane in lanes]))


def expect(engine, opts: RunOptions) -> int | None:
    """Tell the backend how many records the run decodes at most, where cheap to know (--compile auto); the
    corpus's record count (None: not cheap to know), counted once here for the progress bars too."""
    from extractor.store.corpus_path import count_records
    total = count_records(opts.corpus)  # None for streams and remote JSONL
    at_most = opts.limit if total is None else total if opts.limit is None else min(total, opts.limit)
    engine.expect(at_most, opts.params)
    return total
