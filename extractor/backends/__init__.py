"""Backend registry: names map to "module:Class" strings, imported only when chosen, so `extractor --help`
and `extractor eval` never import torch or vLLM."""
from __future__ import annotations

import difflib
from importlib import import_module

from extractor.errors import ExtractorError

BACKENDS = {
    "hf": "extractor.backends.hf:HFBackend",
    "echo": "extractor.backends.echo:EchoBackend",
    "vllm": "extractor.backends.vllm_backend:VLLMBackend",
}


def backend_class(name: str):
    target = BACKENDS.get(name)
    if target is None:
        close = difflib.get_close_matches(name, list(BACKENDS), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ExtractorError(f"unknown backend '{name}'.{hint} Available: {', '.join(sorted(BACKENDS))}")
    module, cls = target.split(":")
    try:
        return getattr(import_module(module), cls)
    except ImportError as exc:
        raise ExtractorError(f"backend '{name}' needs a package that is not installed ({exc.name}); "
                             f"install the matching extra, e.g. pip install 'extractor[{name}]'") from None
