"""`extractor run`'s options for `--backend openai` (extractor/backends/openai_backend.py), defined once.

The address and key are taken as OpenAI's own clients take them: $OPENAI_BASE_URL and $OPENAI_API_KEY, or
the flags. The key never becomes a run setting: --openai-api-key only sets $OPENAI_API_KEY in this process,
where the backend reads it, so it reaches no manifest, no run key and no worker's command line.
"""
from __future__ import annotations

import os

import click


def _key_to_environment(ctx, param, value):
    if value:
        os.environ["OPENAI_API_KEY"] = value


def openai_options(fn):
    options = [
        click.option("--openai-base-url", envvar="OPENAI_BASE_URL", show_envvar=True, default=None,
                     help="openai: the server's API root, e.g. http://localhost:8000/v1 (default: "
                          "https://api.openai.com/v1). --model is then the served model name, --adapter a "
                          "served LoRA adapter's name."),
        click.option("--openai-api-key", expose_value=False, callback=_key_to_environment, default=None,
                     help="openai: the API key (default: $OPENAI_API_KEY; never written to the manifest)."),
        click.option("--openai-concurrency", type=click.IntRange(min=1), default=16, show_default=True,
                     help="openai: requests at the server at once."),
        click.option("--openai-timeout", type=click.FloatRange(min=0, min_open=True), default=600.0,
                     show_default=True, help="openai: seconds to wait for one answer before retrying."),
        click.option("--openai-retries", type=click.IntRange(min=0), default=5, show_default=True,
                     help="openai: retries of a request on 429, 5xx, timeouts and dropped connections "
                          "(exponential backoff from 0.5 s); then the run stops, resumable."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn
