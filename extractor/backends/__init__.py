"""Backend registry: names map to "module:Class" strings, imported only when chosen, so `extractor --help`
and `extractor eval` never import torch or vLLM. Another package adds a backend through the entry-point group
`extractor.backends` (`plugins.py`); the bundled ones are declared there too (pyproject.toml)."""
from __future__ import annotations

from extractor import plugins
from extractor.errors import ExtractorError

BACKENDS = {
    "hf": "extractor.backends.hf:HFBackend",
    "echo": "extractor.backends.echo:EchoBackend",
    "vllm": "extractor.backends.vllm_backend:VLLMBackend",
    "openai": "extractor.backends.openai_backend:OpenAIBackend",
}

REGISTRY = plugins.Registry("extractor.backends", "backend", BACKENDS)


def backend_class(name: str):
    try:
        return REGISTRY.load(name)
    except ImportError as exc:
        raise ExtractorError(f"backend '{name}' needs a package that is not installed ({exc.name}); "
                             f"install the matching extra, e.g. pip install 'extractor[{name}]'") from None
