"""`extractor run`: stream a corpus through a model and write one validated prediction per record. This module
is the command (its options) and its wiring: which checks run and which mode drives the outputs
(`run_modes.py`); what the outputs are is `run_outputs.py`'s, what the run says `run_report.py`'s."""
from __future__ import annotations

import click

from extractor.backends.readahead import read_ahead
from extractor.cli.openai_options import openai_options
from extractor.cli.options import bad_record_options, complete_task_names, corpus_options, tasks_dir_option
from extractor.cli.run_checks import (check_checkpoints, check_corpus_given, check_keep_fields, check_ray_backend,
                                      check_stdio, preflight)
from extractor.cli.run_modes import run_adapters, run_checkpoints, run_on_ray, run_sharded
from extractor.cli.run_outputs import locked_files, output_labels, refuse_overwriting_inputs
from extractor.cli.run_report import say_settings
from extractor.cli.tables import console as make_console
from extractor.hub import RunSources
from extractor.pipeline import output_for_adapter
from extractor.pipeline.claim import Claim
from extractor.pipeline.config import RunConfig
from extractor.plugins import backend_class
from extractor.store import locations
from extractor.store.provenance import check_writable
from extractor.store.writers import is_stdout
from extractor.tasks.task import load_task


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
@click.option("--quantize", type=click.Choice(["none", "fp8"]), default="none", show_default=True,
              help="hf: fp8 runs the decoder layers' linears in FP8 (e4m3 weights per output channel, activations "
                   "per token; embeddings and LM head stay in --dtype); needs a GPU of compute capability 8.9 or "
                   "newer (Ada, Hopper). Quantized checkpoints load without it (docs/quantization.md).")
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
@click.option("--overwrite", is_flag=True,
              help="Replace an existing output (and an existing --rejects file). The old output is kept, hidden "
                   "beside it, until the new run completes, and put back if the new run writes no row.")
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
    check_stdio(cfg)
    task = load_task(cfg.task_name, cfg.tasks_dirs)
    console = make_console(stderr=True, quiet=cfg.quiet)
    check_checkpoints(cfg)
    check_ray_backend(cfg)
    # hub ids -> cached snapshots; fails first
    checkpoints = [RunSources.resolve(model, cfg.adapters, cfg.backend) for model in cfg.models]
    sources = checkpoints[0]
    corpus, out = locations.target(cfg.corpus), locations.target(cfg.out)
    check_corpus_given(cfg, corpus)
    if cfg.print_prompt is not None or cfg.dry_run:
        from extractor.cli.dry_run import dry_run, tokenizer_renderer
        if cfg.dry_run and cfg.print_prompt is None:  # every check the run makes before loading, first
            opts = cfg.run_options(task)
            preflight(cfg, task, opts, sources, [output_for_adapter(opts.out, label, 1)
                                                 for label in output_labels(sources)])
        dry_run(task, tokenizer_renderer(cfg, task, sources), cfg.print_prompt)
        return
    if backend_class(cfg.backend).model_source == "folder" and not cfg.ray_address:
        read_ahead(sources.model)  # into memory while the checks below import torch and transformers
    if len(checkpoints) > 1:
        run_checkpoints(cfg, task, checkpoints, corpus, out, console)
        return
    labels = output_labels(sources)
    outs = [output_for_adapter(out, label, len(labels)) for label in labels]
    refuse_overwriting_inputs(cfg, sources, corpus, outs, task)
    if cfg.gpus:
        run_sharded(cfg, out, console, labels)
        return
    check_keep_fields(cfg)
    opts = cfg.run_options(task)
    to_stdout = is_stdout(opts.out)
    if not to_stdout:
        check_writable(opts.out)
    with Claim([] if to_stdout else outs, [] if to_stdout else locked_files(cfg, outs)):
        if cfg.ray_address:
            run_on_ray(cfg, task, opts, sources, console)
            return
        preflight(cfg, task, opts, sources, outs)
        if cfg.verbose:
            say_settings(console, cfg, opts, outs)
        run_adapters(cfg, task, opts, sources, console)
