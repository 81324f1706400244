"""The backend contract: a batch of prompts in, the same number of generations out, in the same order."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

STOP, LENGTH = "stop", "length"


@dataclass(frozen=True)
class GenParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0
    constrained: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Request:
    prompt: str
    record_id: str = ""  # lets a backend such as `echo` look a record up; others ignore it
    options: dict = field(default_factory=dict)
    adapter: str | None = None  # the backend's name of the adapter to decode with; None: the one in use


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    output_tokens: int
    finish_reason: str  # stop | length
    error: str | None = None  # set when this one request failed (e.g. out of memory) but the batch went on
    decoder: str | None = None  # the decoding path that produced it, where a backend has several (hf: fast, plain)
    decoder_reason: str | None = None  # why it went the plain way, where it could have gone fast


class Backend:
    """Subclasses implement `generate`; everything else (batching policy, caches, adapters) stays inside."""

    name = "base"
    tokenizer = None  # a transformers tokenizer when the backend has one (chat template, token counts)
    supports_constrained = False

    def identity(self) -> dict:
        """What identifies the weights and settings that produced outputs (goes into the manifest)."""
        raise NotImplementedError

    def adapters(self) -> list[str | None]:
        """Adapter names to run, in order; [None] for base weights only."""
        return [None]

    def use_adapter(self, name: str | None) -> None:
        if name is not None:
            raise NotImplementedError(f"backend {self.name} has no adapters")

    def max_input_tokens(self, params: GenParams) -> int | None:
        return None

    def count_tokens(self, prompts: list[str]) -> list[int]:
        return [len(p) for p in prompts]

    def truncate_tokens(self, text: str, n_tokens: int) -> str:
        """`text` cut to its first n_tokens tokens (for --on-long truncate)."""
        return text[:n_tokens]

    def generate(self, requests: list[Request], params: GenParams, schema: dict | None = None) -> list[Generation]:
        raise NotImplementedError

    def generate_stream(self, batches, params: GenParams, schema: dict | None = None, probes: list[str] = ()):
        """Batches of requests in, lists of (request, generation) out as they finish. This default serves one
        batch at a time; a backend that keeps its GPU busy across batches (hf's fast path) overrides it.
        probes: prompts rendered with placeholder values, marking where the task's shared prefix ends."""
        for batch in batches:
            if batch:
                yield list(zip(batch, self.generate(batch, params, schema)))

    def close(self) -> None:
        pass


class TokenizerBackend(Backend):
    """Token handling shared by backends that hold a transformers tokenizer (hf, vllm): both must encode a
    prompt the same way, so that the same inputs reach either engine. Both keep `adapter_paths` by name."""

    adapter_paths: dict = {}

    def adapters(self) -> list[str | None]:
        return list(self.adapter_paths) or [None]

    def _encode(self, prompt: str) -> list[int]:
        return self.encode_batch([prompt])[0]

    def encode_batch(self, prompts: list[str]) -> list[list[int]]:
        """Prompts to token ids in one tokenizer call (the Rust tokenizer spreads it over threads)."""
        if not prompts:
            return []
        bos = self.tokenizer.bos_token
        special = [not (bos and p.startswith(bos)) for p in prompts]  # chat templates hold them already
        out: list = [None] * len(prompts)
        for flag in (True, False):
            index = [i for i, s in enumerate(special) if s == flag]
            if index:
                encoded = self.tokenizer([prompts[i] for i in index], add_special_tokens=flag)["input_ids"]
                for i, e in zip(index, encoded):
                    out[i] = e
        return out

    def count_tokens(self, prompts: list[str]) -> list[int]:
        return [len(e) for e in self.encode_batch(prompts)]

    def truncate_tokens(self, text: str, n_tokens: int) -> str:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.tokenizer.decode(ids[:max(0, n_tokens)])


def name_adapters(paths, check) -> dict:
    """Adapter folders by name (the folder's name; a suffix where two share one), each checked first."""
    from pathlib import Path
    named = {}
    for a in paths:
        path = Path(a)
        check(path)
        named[path.name if path.name not in named else f"{path.name}-{len(named)}"] = path
    return named
