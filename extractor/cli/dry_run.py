"""`run --print-prompt ID` and `run --dry-run`: the exact model input of one record, with no weights loaded
and nothing written. The prompt goes to stdout as the model gets it (chat template applied, cut to the limit
under --on-long truncate); its token count and the limit go to stderr. A record split into chunks (--on-long
chunk) shows every chunk's prompt, each after a line on stderr saying which chunk it is, where in the text it
lies and how many tokens it has."""
from __future__ import annotations

import click

from extractor.store.corpus import CorpusReader
from extractor.store.corpus_path import is_stream
from extractor.errors import InputError, LongInputError
from extractor.pipeline.renderer import TRUNCATED_AT, Renderer


def dry_run(task, renderer: Renderer, record_id: str | None) -> None:
    """The first record's model input (--dry-run, after run_cmd made every check the run makes before
    loading), or record ID's (--print-prompt ID)."""
    opts = renderer.opts
    record = _find(opts, task, record_id)
    try:
        rendered = renderer.render([record])
    except LongInputError as exc:  # shown whole all the same: what is too long is what the user wants to see
        prompt = renderer.builder.build(record["values"])
        click.echo(prompt, nl=not prompt.endswith("\n"))
        click.echo(f"{exc}; the run stops on this record (--on-long {opts.on_long})", err=True)
        return
    if 0 in rendered.skipped:
        click.echo(f"record {record['id']}: {rendered.skipped[0]}", err=True)
        return
    prompts, ids = rendered.prompts[0], rendered.ids[0]
    tokens = [len(i) for i in ids] if ids[0] is not None else renderer.encoder.count_tokens(prompts)
    unit = "tokens" if ids[0] is not None else "characters (this backend has no local tokenizer)"
    limit = f"limit {renderer.limit}" if renderer.limit is not None else "no limit known before loading"
    cut = "; its text was cut to fit (--on-long truncate)" if record.get(TRUNCATED_AT) else ""
    fmt = "chat template" if renderer.builder.chat else "raw format"
    chunks = rendered.chunks.get(0)
    for k, prompt in enumerate(prompts):
        if chunks:
            c = chunks[k]
            click.echo(f"record {record['id']}: chunk {k + 1} of {len(chunks)}, text[{c.start}:{c.end}], "
                       f"{tokens[k]} prompt {unit}", err=True)
        click.echo(prompt, nl=bool(chunks) or not prompt.endswith("\n"))  # chunks: each on lines of its own
    if chunks:
        click.echo(f"record {record['id']}: over the {limit}, split into {len(chunks)} chunks (--on-long chunk, "
                   f"overlap {renderer.chunking.overlap}): {', '.join(map(str, tokens))} prompt {unit}; {fmt}",
                   err=True)
        return
    click.echo(f"record {record['id']}: {tokens[0]} prompt {unit}, {limit}; {fmt}{cut}", err=True)


def tokenizer_renderer(cfg, task, sources) -> Renderer:
    """The run's renderer without its weights: on the tokenizer alone (hf, vllm), else characters."""
    from extractor.cli.run_outputs import adapter_lane
    from extractor.pipeline import preflight
    from extractor.plugins import backend_class
    if backend_class(cfg.backend).model_source == "folder":
        view = preflight.TokenizerView(sources.model, sources.adapters, cfg.trust_remote_code, cfg.backend)
        name = view.adapters()[0]
    else:
        view, name = preflight.NoTokenizer(cfg.backend), None
        view.tokenizer = backend_class(cfg.backend).tokenizer  # openai: chat messages, as the server gets them
    opts = cfg.run_options(task)
    # Through the adapter's lane where there is one: its label is checked as the run would check it.
    return adapter_lane(task, view, opts, sources, name).renderer if name else Renderer(task, view, opts)


def _find(opts, task, record_id: str | None) -> dict:
    """The record with this id (the first record when None), read with the run's field mapping."""
    reader = CorpusReader(opts.corpus, task.spec.input_fields, opts.id_field, opts.text_field, opts.on_bad,
                          None, batch_size=256)
    for window in reader:
        for record in window:
            if record_id is None or record["id"] == record_id:
                return record
    where = "the corpus has no records" if record_id is None else f"no record has id '{record_id}'"
    hint = "" if is_stream(opts.corpus) or record_id is None else \
        f" (ids come from --id-field {opts.id_field}; without it they are line numbers)"
    raise InputError(f"{opts.corpus}: {where}{hint}")
