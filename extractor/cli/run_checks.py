"""`extractor run`'s checks before anything loads: the command line's combinations (stdin and stdout, several
checkpoints, --ray), the corpus, --keep-field against the output's own fields, and what can fail without the
weights (pipeline/preflight.py: an output already there, a --resume with other settings, the first window's
prompts)."""
from __future__ import annotations

from extractor.cli.run_outputs import adapter_lane
from extractor.errors import InputError
from extractor.hub import RunSources
from extractor.pipeline import RESERVED, RunOptions
from extractor.pipeline.config import RunConfig
from extractor.pipeline.row_judge import INPUT_TRUNCATED
from extractor.plugins import backend_class
from extractor.store.corpus_path import check_corpus, is_stdin, is_stream
from extractor.store.writers import is_stdout


def check_stdio(cfg: RunConfig) -> None:
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


def check_checkpoints(cfg: RunConfig) -> None:
    """Several --model: full checkpoints swapped into one hf backend, on their own (no adapters, one process)."""
    if len(cfg.models) < 2:
        return
    if not backend_class(cfg.backend).swaps_checkpoints:
        raise InputError(f"--model given {len(cfg.models)} times: only --backend hf scores several checkpoints in "
                         "one process; run one command per checkpoint")
    for flag, used in (("--adapter", cfg.adapters), ("--gpus", cfg.gpus), ("--ray", cfg.ray_address)):
        if used:
            raise InputError(f"--model given {len(cfg.models)} times cannot be combined with {flag}; run one "
                             "command per checkpoint")


def check_ray_backend(cfg: RunConfig) -> None:
    """--ray starts a backend on each worker: one with a model to start."""
    if cfg.ray_address and backend_class(cfg.backend).model_source == "server":
        raise InputError("--ray starts a model on each Ray worker, and --backend openai has none to start (the server "
                         "decodes); run without --ray and raise --openai-concurrency instead")


def check_corpus_given(cfg: RunConfig, corpus) -> None:
    """The corpus readable as what its name says, before anything else; a FIFO only where it is read once."""
    check_corpus(corpus)
    if is_stream(corpus) and (cfg.gpus or cfg.ray_address):
        how = "--gpus workers each read" if cfg.gpus else "--ray reads"
        raise InputError(f"{corpus}: is a FIFO, which can be read once only, and {how} the corpus on their own; "
                         "save the stream to a file first")


def check_keep_fields(cfg: RunConfig) -> None:
    """--keep-field may not name a field the output rows have of their own."""
    clash = (RESERVED | {INPUT_TRUNCATED}).intersection(cfg.keep_fields)
    if clash:
        raise InputError(f"--keep-field {', '.join(sorted(clash))} would overwrite an output field; keep others")


def preflight(cfg: RunConfig, task, opts: RunOptions, sources: RunSources, outs: list) -> None:
    """What can fail without the weights fails before they load (pipeline/preflight.py): an output already
    there; with hf, from the tokenizer alone, a --resume with other settings and the first window's prompts
    (length, rendering, bad records)."""
    from extractor.pipeline import preflight as checks
    checks.refuse_existing(outs, cfg.resume, cfg.overwrite)
    if cfg.backend != "hf":
        return
    view = checks.TokenizerView(sources.model, sources.adapters, cfg.trust_remote_code)
    lanes = [adapter_lane(task, view, opts, sources, name) for name in view.adapters()]
    if cfg.resume:
        keys = [checks.partial_key(task, lane, opts) for lane in lanes]
        checks.check_resume(outs, keys if len(keys) == len(outs) else keys[:1] * len(outs))
    if not is_stream(opts.corpus):
        for lane in lanes:
            checks.check_first_window(lane.renderer, opts)
