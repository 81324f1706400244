"""`extractor run`: stream a corpus through a model and write one validated prediction per record."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import click

from extractor.store import locations
from extractor.plugins import backend_class
from extractor.store.clashes import FileSet, refuse_overlaps, rejects_written, written_beside
from extractor.cli.openai_options import openai_options
from extractor.cli.options import bad_record_options, complete_task_names, corpus_options, tasks_dir_option
from extractor.cli.tables import console as make_console, status_table
from extractor.store.corpus_path import check_corpus, is_stdin, is_stream
from extractor.errors import InputError
from extractor.hub import RunSources
from extractor.pipeline import OnePass, Predictor, Run, RunOptions, Summary, output_for_adapter, run_key
from extractor.pipeline.claim import Claim
from extractor.pipeline.config import RunConfig
from extractor.pipeline.predictor import INPUT_TRUNCATED
from extractor.pipeline.summary import NoResultError
from extractor.store.provenance import check_writable
from extractor.results.rows import RESERVED
from extractor.tasks.task import load_task
from extractor.store.writers import is_stdout


@click.command()
@click.argument("corpus", type=click.Path(dir_okay=False))  # or a URI: s3://, gs://, az://, hf://; - for stdin
@click.option("--task", "task_name", required=True, help="Task name (see `extractor tasks`).",
              shell_complete=complete_task_names)
@click.option("--model", "models", required=True, multiple=True,
              help="Local model folder, or a hub id ORG/NAME[@revision] found in the local Hugging Face cache "
                   "(hf, vllm; never downloaded); a gold file (echo). hf: repeat it to score several full "
                   "checkpoints of one architecture in one process, each loaded in place of the last (the "
                   "decoder, its compiled code and graphs kept), one output each (preds.<checkpoint>.jsonl).")
@click.option("--out", required=True, type=click.Path(dir_okay=False, allow_dash=True),
              help="Predictions: .jsonl or .parquet, a local path or an s3:// gs:// az:// URI; - for JSONL on stdout "
                   "(no manifest, no --resume).")
@click.option("--backend", default="hf", show_default=True, help="hf | vllm | echo | openai (a server: --openai-*)")
@click.option("--tensor-parallel", type=click.IntRange(min=1), default=1, show_default=True,
              help="vllm: GPUs per model replica.")
@click.option("--adapter", "adapters", multiple=True,
              help="peft adapter folder (LoRA, P-tuning, prefix, prompt tuning) or cached hub id; repeat to score "
                   "several, one output file each (preds.<adapter>.jsonl).")
@click.option("--dtype", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default="auto", show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N")
@click.option("--trust-remote-code", is_flag=True, help="Allow the model folder's own Python code (off by default).")
@click.option("--fast", type=click.Choice(["off", "auto", "on"]), default="auto", show_default=True,
              help="hf: FastDecoder (shared-prefix KV, continuous batching across windows; CUDA graphs on CUDA) "
                   "for greedy base-weight runs of the model types on its list (docs/backends.md), constrained or not. "
                   "auto: where it applies, else plain generate with one line saying why; on: FastDecoder or "
                   "exit 2; off: plain generate.")
@click.option("--compile", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="hf fast path: torch.compile its layers (regionally: one layer compiled, reused by all). auto: "
                   "on CUDA only where the run's output tokens repay the compile (about 3M: it costs seconds to "
                   "tens of seconds a process); never on CPU. The choice and why are in the manifest's startup.")
@click.option("--constrained", is_flag=True, help="Constrain decoding to the task's JSON Schema (xgrammar).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=None, help="Default: the task's.")
@click.option("--temperature", type=click.FloatRange(min=0), default=None, help="0 = greedy (the task's default).")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=None)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--batch-tokens", type=click.IntRange(min=1), default=32768, show_default=True,
              help="Token budget per batch: (longest prompt + max new tokens) x batch size.")
@click.option("--window", type=click.IntRange(min=1), default=256, show_default=True,
              help="Records per write (appended and fsynced together). A kill loses at most the unwritten rows "
                   "and the records in flight; --resume redoes them.")
@click.option("--max-input-tokens", type=click.IntRange(min=1), default=None,
              help="Prompt token limit (default: the model's context minus max new tokens).")
@click.option("--on-long", type=click.Choice(["fail", "truncate", "skip", "chunk"]), default=None,
              help="A prompt over the limit: stop, cut the record's text, write it with status error, or split "
                   "its text at sentence or line ends into overlapping chunks, one request each, merged into "
                   "one row. Default: the task's on_long, else fail.")
@click.option("--chunk-tokens", type=click.IntRange(min=1), default=None,
              help="--on-long chunk: tokens of the record's text per chunk (default: the task's chunk_tokens, "
                   "else as many as fit the limit).")
@click.option("--chunk-overlap", type=click.IntRange(min=0), default=None,
              help="--on-long chunk: tokens each chunk repeats of the one before, at most half a chunk (default: "
                   "the task's chunk_overlap, else 64).")
@click.option("--few-shot", type=click.IntRange(min=0), default=None,
              help="Use only the first N of the task's few-shot examples (default: all).")
@click.option("--keep-field", "keep_fields", multiple=True, help="Copy this input field into each output record.")
@click.option("--resume", is_flag=True, help="Continue an existing output (same settings), skipping ids written.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output (and an existing --rejects file).")
@click.option("--allow-no-result", is_flag=True, envvar="EXTRACTOR_ALLOW_NO_RESULT",
              help="Exit 0 even when no record came out ok or repaired (by default such a run exits 1 with the "
                   "status counts; its output is still written whole). Also $EXTRACTOR_ALLOW_NO_RESULT=1.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Stop after this many new records.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary table.")
@click.option("-v", "--verbose", is_flag=True, help="Also say the settings the run resolved (prompt format, token "
                                                    "limit, outputs) before it starts.")
@click.option("--log-file", type=click.Path(dir_okay=False), default=None,
              help="Also append every line written to stderr (progress as its final line) to this file.")
@click.option("--print-prompt", metavar="ID", default=None,
              help="Print record ID's exact model input (chat template applied) to stdout and its token count to "
                   "stderr; load no weights, write nothing.")
@click.option("--dry-run", is_flag=True,
              help="Run every check that needs no weights (outputs, --resume settings, the first window's prompts), "
                   "print the first record's model input as --print-prompt does, and exit.")
@click.option("--gpus", type=click.IntRange(min=1), default=None,
              help="Worker processes, one per GPU (with --device cpu: CPU workers); shards merged in input order.")
@click.option("--shard", default=None, hidden=True, help="K/N: this worker's share (set by --gpus).")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None,
              help="Run on Ray Data: alone for a local instance, or a cluster address (HOST:6379, auto).")
@click.option("--ray-workers", type=click.IntRange(min=1), default=2, show_default=True,
              help="Actors in the Ray pool (one backend each; one GPU each with --device cuda).")
@openai_options
@corpus_options
@bad_record_options
@tasks_dir_option
def run(**params):
    """Extract from CORPUS with a model; one validated prediction per record in --out.

    \b
    CORPUS - reads JSONL from stdin; --out - writes JSONL to stdout. Neither can be resumed (stdin cannot be
    read again to check it, stdout keeps no rows to continue): --resume is refused with them.

    \b
    Examples:
      extractor run corpus.jsonl --task jd_requirements --model ./model --out preds.jsonl
      extractor run corpus.jsonl --task jd_requirements --model ./model --adapter ./lora --constrained \\
          --out preds.jsonl --resume
      extractor run corpus.jsonl --task jd_requirements --model ./model --out x --print-prompt jd-17
      cat corpus.jsonl | extractor run - --task jd_requirements --model ./model --out - -q | jq .prediction
    """
    cfg = RunConfig.from_params(params)
    if cfg.log_file:
        from extractor.cli.logfile import tee_stderr
        tee_stderr(cfg.log_file)
    _check_stdio(cfg)
    task = load_task(cfg.task_name, cfg.tasks_dirs)
    console = make_console(stderr=True, quiet=cfg.quiet)
    _check_checkpoints(cfg)
    if cfg.ray_address and cfg.backend == "openai":
        raise InputError("--ray starts a model on each Ray worker, and --backend openai has none to start (the server "
                         "decodes); run without --ray and raise --openai-concurrency instead")
    # hub ids -> cached snapshots; fails first
    checkpoints = [RunSources.resolve(model, cfg.adapters, cfg.backend) for model in cfg.models]
    sources = checkpoints[0]
    corpus, out = locations.target(cfg.corpus), locations.target(cfg.out)
    _check_corpus(cfg, corpus)
    if cfg.print_prompt is not None or cfg.dry_run:
        from extractor.cli.dry_run import dry_run
        if cfg.dry_run and cfg.print_prompt is None:  # every check the run makes before loading, first
            opts = cfg.run_options(task)
            _preflight(cfg, task, opts, sources, [output_for_adapter(opts.out, label, 1)
                                                  for label in _output_labels(sources)])
        dry_run(cfg, task, _make_predictor(cfg, task, sources), console)
        return
    if len(checkpoints) > 1:
        _run_checkpoints(cfg, task, checkpoints, corpus, out, console)
        return
    labels = _output_labels(sources)
    outs = [output_for_adapter(out, label, len(labels)) for label in labels]
    _refuse_overwriting_inputs(cfg, sources, corpus, outs)
    if cfg.gpus:
        _run_sharded(cfg, out, console, labels)
        return
    clash = (RESERVED | {INPUT_TRUNCATED}).intersection(cfg.keep_fields)
    if clash:
        raise InputError(f"--keep-field {', '.join(sorted(clash))} would overwrite an output field; keep others")
    opts = cfg.run_options(task)
    to_stdout = is_stdout(opts.out)
    if not to_stdout:
        check_writable(opts.out)
    with Claim([] if to_stdout else outs, [] if to_stdout else _locked(cfg, outs)):
        if cfg.ray_address:
            _run_on_ray(cfg, task, opts, sources, console)
            return
        _preflight(cfg, task, opts, sources, outs)
        if cfg.verbose:
            _say_settings(console, cfg, opts, outs)
        engine = backend_class(cfg.backend)(**cfg.backend_kwargs(sources.model, sources.adapters))
        total = _expect(engine, opts)
        names = engine.adapters()
        if len(names) > 1 and engine.decodes_together(names, opts.params):
            _run_in_one_pass(cfg, task, engine, opts, sources, names, console, total)
            return
        targets, summaries = [], []
        for name in names:  # one run per adapter, one after another: this backend cannot decode them together
            predictor = _adapter_predictor(cfg, task, engine, opts, sources, name)
            job = Run(predictor, opts, output_for_adapter(opts.out, predictor.adapter, len(names)), console,
                      total=total)
            targets.append(job.out)
            summaries.append(job.execute(job.prepare(_key(task, engine, predictor, opts, sources))))
            _finish(console, [job.out], [summaries[-1]], cfg, check_results=False)
        _check_results(cfg, targets, [summary.statuses for summary in summaries])


def _check_checkpoints(cfg: RunConfig) -> None:
    """Several --model: full checkpoints swapped into one hf backend, on their own (no adapters, one process)."""
    if len(cfg.models) < 2:
        return
    if cfg.backend != "hf":
        raise InputError(f"--model given {len(cfg.models)} times: only --backend hf scores several checkpoints in "
                         "one process; run one command per checkpoint")
    for flag, used in (("--adapter", cfg.adapters), ("--gpus", cfg.gpus), ("--ray", cfg.ray_address)):
        if used:
            raise InputError(f"--model given {len(cfg.models)} times cannot be combined with {flag}; run one "
                             "command per checkpoint")


def checkpoint_labels(models: list[str]) -> list[str]:
    """Each checkpoint's output label: its folder's name; where two share one, parent-name (run1-best)."""
    paths = [Path(m) for m in models]
    labels = [p.name for p in paths]
    for i, p in enumerate(paths):
        if labels.count(p.name) > 1:
            labels[i] = f"{p.parent.name}-{p.name}"
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:
        raise InputError(f"--model: two checkpoints would both write preds.{twice[0]}.jsonl; give folders whose "
                         "names (or parent and name) differ")
    return labels


def _run_checkpoints(cfg: RunConfig, task, checkpoints: list[RunSources], corpus, out, console) -> None:
    """Each checkpoint's weights into the same loaded model in turn, each its own Run and output, exactly as
    one command per checkpoint would write them."""
    from extractor.backends.checkpoint_swap import check_swappable
    for later in checkpoints[1:]:  # before anything loads, not after the first checkpoint's whole run
        check_swappable(Path(checkpoints[0].model), Path(later.model))
    labels = checkpoint_labels([c.model for c in checkpoints])
    outs = [output_for_adapter(out, label, len(labels)) for label in labels]
    for sources in checkpoints:
        _refuse_overwriting_inputs(cfg, sources, corpus, outs)
    opts = cfg.run_options(task)
    check_writable(opts.out)
    with Claim(outs, _locked(cfg, outs)):
        _preflight(cfg, task, opts, checkpoints[0], outs)
        engine = backend_class(cfg.backend)(**cfg.backend_kwargs(checkpoints[0].model, ()))
        total = _expect(engine, opts)
        targets, summaries = [], []
        for i, (sources, target) in enumerate(zip(checkpoints, outs)):
            if i:
                engine.use_checkpoint(Path(sources.model))
            predictor = _predictor(cfg, task, engine, opts)
            job = Run(predictor, opts, target, console, total=total)
            targets.append(target)
            summaries.append(job.execute(job.prepare(_key(task, engine, predictor, opts, sources))))
            _finish(console, [target], [summaries[-1]], cfg, check_results=False)
        _check_results(cfg, targets, [summary.statuses for summary in summaries])


def _check_stdio(cfg: RunConfig) -> None:
    """`-` for stdin or stdout: one stream, read or written once, by one process; nothing to resume."""
    stdin, stdout = is_stdin(cfg.corpus), is_stdout(cfg.out)
    if not (stdin or stdout):
        return
    what = "the corpus from stdin (-)" if stdin else "--out - (stdout)"
    if cfg.resume:
        why = ("stdin cannot be read again to check it is the corpus the output was made from" if stdin
               else "stdout keeps no rows to continue from")
        raise InputError(f"--resume does not apply to {what}: {why}; save the corpus to a file, or write --out to "
                         "a file, to be able to resume")
    for flag, used in (("--gpus", cfg.gpus), ("--ray", cfg.ray_address)):
        if used:
            raise InputError(f"{flag} cannot be combined with {what}: its workers each need the file; use files")
    if stdout:
        if len(cfg.models) > 1 or len(cfg.adapters) > 1:
            raise InputError("--out - (stdout) takes one output: give one --model and at most one --adapter, or "
                             "write --out to a file (one file per adapter or checkpoint)")
        if cfg.on_bad_record == "skip" and not cfg.rejects:
            raise InputError("--out - with --on-bad-record skip: name the rejects file with --rejects PATH")


def _say_settings(console, cfg: RunConfig, opts: RunOptions, outs: list) -> None:
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


def _make_predictor(cfg: RunConfig, task, sources: RunSources):
    """A predictor for --print-prompt and --dry-run: on the tokenizer alone (hf, vllm), else characters."""
    from extractor.pipeline import preflight
    if cfg.backend in ("hf", "vllm"):
        view = preflight.TokenizerView(sources.model, sources.adapters, cfg.trust_remote_code, cfg.backend)
        name = view.adapters()[0]
    else:
        view, name = preflight.NoTokenizer(cfg.backend), None
        view.tokenizer = backend_class(cfg.backend).tokenizer  # openai: chat messages, as the server gets them
    opts = cfg.run_options(task)
    return _adapter_predictor(cfg, task, view, opts, sources, name) if name else _predictor(cfg, task, view, opts)


def _preflight(cfg: RunConfig, task, opts: RunOptions, sources: RunSources, outs: list) -> None:
    """What can fail without the weights fails before they load (pipeline/preflight.py): an output already
    there; with hf, from the tokenizer alone, a --resume with other settings and the first window's prompts
    (length, rendering, bad records)."""
    from extractor.pipeline import preflight
    preflight.refuse_existing(outs, cfg.resume, cfg.overwrite)
    if cfg.backend != "hf":
        return
    view = preflight.TokenizerView(sources.model, sources.adapters, cfg.trust_remote_code)
    predictors = [_adapter_predictor(cfg, task, view, opts, sources, name) for name in view.adapters()]
    if cfg.resume:
        keys = [preflight.partial_key(task, p, opts) for p in predictors]
        preflight.check_resume(outs, keys if len(keys) == len(outs) else keys[:1] * len(outs))
    if not is_stream(opts.corpus):
        for predictor in predictors:
            preflight.check_first_window(predictor, opts)


def _expect(engine, opts: RunOptions) -> int | None:
    """Tell the backend how many records the run decodes at most, where cheap to know (--compile auto); the
    corpus's record count (None: not cheap to know), counted once here for the progress bars too."""
    from extractor.store.corpus_path import count_records
    total = count_records(opts.corpus)  # None for streams and remote JSONL
    at_most = opts.limit if total is None else total if opts.limit is None else min(total, opts.limit)
    engine.expect(at_most, opts.params)
    return total


def _check_corpus(cfg: RunConfig, corpus) -> None:
    """The corpus readable as what its name says, before anything else; a FIFO only where it is read once."""
    check_corpus(corpus)
    if is_stream(corpus) and (cfg.gpus or cfg.ray_address):
        how = "--gpus workers each read" if cfg.gpus else "--ray reads"
        raise InputError(f"{corpus}: is a FIFO, which can be read once only, and {how} the corpus on their own; "
                         "save the stream to a file first")


def _refuse_overwriting_inputs(cfg: RunConfig, sources: RunSources, corpus, outs: list) -> None:
    """No file the run writes (outputs, manifests, journals, locks, rejects) may be one of its inputs."""
    inputs = FileSet()
    if not is_stdin(corpus):
        inputs.add(f"the corpus ({corpus})", corpus)
    model = Path(sources.model)
    if cfg.backend == "echo":
        inputs.add(f"the echo backend's --model file ({sources.model})", model)
    elif model.is_dir():
        inputs.add_folder(f"a file of the --model folder {sources.model}", model)
    for adapter in sources.adapters:
        if Path(adapter).is_dir():
            inputs.add_folder(f"a file of the --adapter folder {adapter}", Path(adapter))
    writes = [("--out", o, written_beside(o)) for o in outs if not is_stdout(o)]
    rejects = _rejects(cfg, outs)
    writes += [("--rejects", r, rejects_written(r)) for r in rejects]
    refuse_overlaps(writes, inputs)


def _rejects(cfg: RunConfig, outs: list) -> list:
    """The rejects files the run writes: --rejects, or one beside each output (--on-bad-record skip only)."""
    if cfg.on_bad_record != "skip":
        return []
    if cfg.rejects:
        return [locations.target(cfg.rejects)]
    return [o.with_name(o.name + ".rejects.jsonl") for o in outs]


def _locked(cfg: RunConfig, outs: list) -> list:
    """The files locked for the run's life: each output, and an explicit --rejects (--gpus workers share
    their parent's, which the parent holds)."""
    locked = [(o, "--out") for o in outs]
    if cfg.rejects and cfg.on_bad_record == "skip" and not cfg.shard:
        locked.append((locations.target(cfg.rejects), "--rejects"))
    return locked


def _run_sharded(cfg: RunConfig, out, console, labels) -> None:
    from extractor.runners.shards import outputs, run_sharded
    ctx = click.get_current_context()
    targets = [target for target, _ in outputs(out, cfg.gpus, labels)]
    check_writable(out)
    with Claim([], _locked(cfg, targets)):
        if cfg.rejects and cfg.on_bad_record == "skip" and not (cfg.overwrite or cfg.resume) \
                and locations.exists(locations.target(cfg.rejects)):
            raise InputError(f"--rejects {cfg.rejects} already exists; pass --overwrite to replace it or choose "
                             "another --rejects")
        merged = run_sharded(ctx.command, ctx.params, out, cfg.gpus, cfg.device, console, labels)
        _check_results(cfg, [target for target, _ in merged], [statuses for _, statuses in merged])


def _run_in_one_pass(cfg: RunConfig, task, engine, opts: RunOptions, sources: RunSources, names, console,
                     total: int | None) -> None:
    """Every adapter's requests through one stream of a backend that mixes them; one output each."""
    predictors = [_adapter_predictor(cfg, task, engine, opts, sources, name) for name in names]
    job = OnePass(predictors, opts, [output_for_adapter(opts.out, p.adapter, len(names)) for p in predictors],
                  console, total)
    dones = job.prepare([_key(task, engine, p, opts, sources) for p in predictors])
    _finish(console, [run.out for run in job.runs], job.execute(dones), cfg)


def _adapter_predictor(cfg: RunConfig, task, engine, opts: RunOptions, sources: RunSources, name) -> Predictor:
    """The predictor whose requests name adapter `name`; its rows carry the adapter's label."""
    predictor = _predictor(cfg, task, engine, opts, name)
    predictor.adapter = _adapter_labels(sources).get(name, name)
    return predictor


def _adapter_labels(sources: RunSources) -> dict:
    """Backend adapter name -> the label its rows and output carry: the folder's name; where two folders share
    one (runs/a/best, runs/b/best), parent-name (a-best, b-best), not best and best-1."""
    from extractor.backends.base import name_adapters
    paths = name_adapters(sources.adapters, lambda path: None)
    folder_names = [Path(p).name for p in paths.values()]
    labels = {}
    for name, path in paths.items():
        path = Path(path)
        shared = folder_names.count(path.name) > 1 and name not in sources.adapter_labels
        labels[name] = f"{path.parent.name}-{path.name}" if shared else sources.adapter_labels.get(name, name)
    twice = sorted({label for label in labels.values() if list(labels.values()).count(label) > 1})
    if twice:
        raise InputError(f"--adapter: two adapters would both be labelled '{twice[0]}' (preds.{twice[0]}.jsonl); give "
                         "folders whose names (or parent and name) differ")
    return labels


def _output_labels(sources: RunSources) -> list[str | None]:
    """The label each adapter's output is named by (as the backend names the adapters; [None]: none)."""
    return list(_adapter_labels(sources).values()) or [None]


def _predictor(cfg: RunConfig, task, backend, opts: RunOptions, adapter_key: str | None = None) -> Predictor:
    return Predictor(task, backend, opts.params, opts.on_long, cfg.max_input_tokens, tuple(cfg.keep_fields),
                     cfg.few_shot, adapter_key, chunking=opts.chunking)


def _key(task, engine, predictor, opts, sources: RunSources) -> dict:
    """What --resume must match; with hub ids, also the id, revision and snapshot they led to."""
    key = run_key(task, engine, predictor, opts)
    if sources.hub:
        key["hub"] = sources.hub
    return key


def _run_on_ray(cfg: RunConfig, task, opts: RunOptions, sources: RunSources, console) -> None:
    from extractor.runners.ray_runner import DriverView, RayRun, check_ray_installed
    check_ray_installed()
    if len(sources.adapters) > 1:
        raise InputError("--ray runs one adapter at a time; start one run per adapter")
    adapter = sources.adapters[0] if sources.adapters else None
    view = DriverView(cfg.backend, sources.model, adapter, cfg.dtype, cfg.trust_remote_code)
    predictor = _predictor(cfg, task, view, opts)
    predictor.adapter = sources.adapter_labels.get(Path(adapter).name, Path(adapter).name) if adapter else None
    job = RayRun(predictor, opts, console, cfg, sources)
    _finish(console, [job.out], [job.execute(job.prepare(_key(task, view, predictor, opts, sources)))], cfg)


def _finish(console, targets: list, summaries: list, cfg: RunConfig, check_results: bool = True) -> None:
    """Each output's summary; when Ctrl-C stopped them, one line on resuming and exit code 130; when an output
    holds no usable result, one line and exit code 1."""
    for target, summary in zip(targets, summaries):
        _report(console, target, summary)
    if any(summary.interrupted for summary in summaries):
        console.print("stopped early; rerun the same command with --resume to continue")
        raise SystemExit(130)
    if check_results:
        _check_results(cfg, targets, [summary.statuses for summary in summaries])


def _check_results(cfg: RunConfig, targets: list, statuses: list) -> None:
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


def _report(console, target: Path, summary) -> None:
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
