"""Plugin seams and the registries behind them, as simonw/llm has them: an installed package adds a backend or a scoring kind by declaring
an entry point in one of these groups, `name = "module:attribute"` (pyproject.toml's [project.entry-points]).
The bundled ones are declared the same way and listed beside each registry too, so a checkout whose installed
metadata predates one still finds it. Lookups give "module:attribute" strings: nothing is imported until a
name is chosen (`extractor --help` and `extractor eval` never import torch).
"""
from __future__ import annotations

import difflib
from importlib import import_module

from extractor.errors import ExtractorError


class Registry:
    """Names -> "module:attribute" for one entry-point group: the bundled ones, then the installed plugins'
    (a bundled name wins where both declare it)."""

    def __init__(self, group: str, what: str, bundled: dict[str, str]):
        self.group, self.what, self.bundled = group, what, bundled

    def names(self) -> dict[str, str]:
        from importlib.metadata import entry_points
        return {**{ep.name: ep.value for ep in entry_points(group=self.group)}, **self.bundled}

    def find(self, name: str) -> str:
        """The "module:attribute" registered as `name` (a bundled name is known without scanning the installed
        packages), or an error naming the closest and all known names."""
        if name in self.bundled:
            return self.bundled[name]
        names = self.names()
        if name not in names:
            close = difflib.get_close_matches(name, list(names), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ExtractorError(f"unknown {self.what} '{name}'.{hint} Available: {', '.join(sorted(names))}")
        return names[name]

    def load(self, name: str):
        """Import what `name` is registered as (an ImportError goes to the caller, which knows the fix)."""
        module, attr = self.find(name).split(":")
        return getattr(import_module(module), attr)


# The bundled backends and scoring kinds (pyproject.toml declares the same entry points).
BACKENDS = {
    "hf": "extractor.backends.hf:HFBackend",
    "echo": "extractor.backends.echo:EchoBackend",
    "vllm": "extractor.backends.vllm_backend:VLLMBackend",
    "openai": "extractor.backends.openai_backend:OpenAIBackend",
}
SCORING_KINDS = {
    "fields": "extractor.scoring.facts:FieldFacts",
    "tuples": "extractor.scoring.facts:TupleFacts",
    "labels": "extractor.scoring.facts:LabelFacts",
}
BACKEND_REGISTRY = Registry("extractor.backends", "backend", BACKENDS)
SCORING_REGISTRY = Registry("extractor.scoring_kinds", "scoring kind", SCORING_KINDS)


def backend_class(name: str):
    """The backend class registered as `name` (imported only now: `extractor --help` never imports torch)."""
    try:
        return BACKEND_REGISTRY.load(name)
    except ImportError as exc:
        raise ExtractorError(f"backend '{name}' needs a package that is not installed ({exc.name}); "
                             f"install the matching extra, e.g. pip install 'extractor[{name}]'") from None


def scoring_kind(name: str):
    """The scoring kind (a FactKind subclass, scoring/facts.py) registered as `name`."""
    return SCORING_REGISTRY.load(name)
