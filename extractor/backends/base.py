"""The backend contract, streaming first: `generate_stream` takes an iterator of typed `Request`s and yields
(request, generation) pairs as they finish, in any order; `generate` is the batch form (same number out, in
order). The pipeline's view of a backend's tokenizer is a `TextEncoder`, taken once (`backend.encoder()`),
so nothing calls back into a backend while it pulls requests. Knobs are constructor arguments.
"""
from __future__ import annotations

import itertools
from collections import deque
from dataclasses import asdict, dataclass
from typing import Iterable, Iterator

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
    ids: list[int] | None = None  # the prompt's token ids, where the caller encoded them (else the backend does)
    seq: int | None = None  # the caller's sequence number: a stream's results come back in any order
    adapter: str | None = None  # the backend's name of the adapter to decode with; None: the one in use
    budget: int | None = None  # new tokens for this request at most; None: the call's params.max_new_tokens
    window: int | None = None  # the caller's reading window it came in (the default stream serves one per call)

    def new_tokens(self, params: GenParams) -> int:
        """This request's budget of new tokens: its own, else the call's."""
        return self.budget if self.budget is not None else params.max_new_tokens


def batched(items: Iterable, size: int) -> Iterator[list]:
    items = iter(items)
    while batch := list(itertools.islice(items, max(1, size))):
        yield batch


def by_window(requests: Iterable[Request], size: int) -> Iterator[list[Request]]:
    """Consecutive requests of one window (`Request.window`), at most `size` at a time: a batch is served as
    soon as its window is complete, without waiting for later windows to be read."""
    batch: list[Request] = []
    for request in requests:
        if batch and (len(batch) >= size or request.window != batch[-1].window):
            yield batch
            batch = []
        batch.append(request)
    if batch:
        yield batch


class Lookahead:
    """An iterator that can be looked ahead of by a bounded window."""

    def __init__(self, items: Iterable):
        self._items = iter(items)
        self._ahead: deque = deque()

    def peek(self, n: int) -> list:
        while len(self._ahead) < n and (item := next(self._items, None)) is not None:
            self._ahead.append(item)
        return list(itertools.islice(self._ahead, n))

    def take(self, n: int) -> list:
        self.peek(n)
        return [self._ahead.popleft() for _ in range(min(n, len(self._ahead)))]

    def take_while(self, keep) -> Iterator:
        """Items while `keep(item)`, pulled one at a time; the first one that fails stays ahead."""
        while self.peek(1) and keep(self._ahead[0]):
            yield self._ahead.popleft()


class TextEncoder:
    """What the pipeline needs of a backend's tokenizer: token counts, truncation, and the token ids it hands
    over in each request. This one counts characters and hands over no ids (backends without a tokenizer)."""

    def encode_batch(self, prompts: list[str]) -> list[list[int]] | None:
        return None

    def count_tokens(self, prompts: list[str]) -> list[int]:
        return [len(p) for p in prompts]

    def count_tokens_upto(self, prompts: list[str], limit: int) -> list[tuple[int, bool]]:
        """(count, whole) per prompt: its exact token count (whole: True) wherever that is at most `limit`;
        a prompt over it may instead get the count of a head of it that is already over (whole: False),
        found in time and memory bounded by the limit rather than by the prompt."""
        return [(n, True) for n in self.count_tokens(prompts)]

    def head(self, text: str, n_tokens: int) -> str:
        """A prefix of `text` holding more than n_tokens tokens, or all of it: what --on-long truncate can
        keep of a text, found without reading the rest."""
        return text[:n_tokens + 1]

    def truncate_tokens(self, text: str, n_tokens: int) -> str:
        """`text` cut to its first n_tokens tokens (for --on-long truncate)."""
        return text[:max(0, n_tokens)]


class TokenizerEncoder(TextEncoder):
    """A transformers tokenizer's encoding, the same for every backend that holds one (hf, vllm), so the same
    inputs reach either engine."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._max_chars: int | None = None

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

    # Tokens a head's count must pass the limit by: a cut can change how the last few tokens before it merge.
    HEAD_SLACK = 16

    def max_token_chars(self) -> int:
        """The most characters one token stands for: its vocabulary's longest spelling (a byte-level,
        SentencePiece or WordPiece spelling is never shorter than the text it decodes to)."""
        if self._max_chars is None:
            self._max_chars = max((len(t) for t in self.tokenizer.get_vocab()), default=1) or 1
        return self._max_chars

    def count_tokens_upto(self, prompts: list[str], limit: int) -> list[tuple[int, bool]]:
        """Prompts short enough to fit in `limit` tokens are counted whole, in one call; a longer one is
        counted on its head (`head`), so a 50 MB record costs what its first few limits' worth costs."""
        bound = (limit + self.HEAD_SLACK) * self.max_token_chars()
        short = [i for i, p in enumerate(prompts) if len(p) <= bound]
        out: list = [None] * len(prompts)
        for i, n in zip(short, self.count_tokens([prompts[i] for i in short])):
            out[i] = (n, True)
        for i in (i for i, p in enumerate(prompts) if len(p) > bound):
            head = self.head(prompts[i], limit)
            out[i] = (self.count_tokens([head])[0], len(head) == len(prompts[i]))
        return out

    def head(self, text: str, n_tokens: int) -> str:
        """Starts from as many characters as n_tokens of the longest token can spell, and doubles until the
        head's count passes n_tokens (a normalizer that drops characters, such as one collapsing
        whitespace, can make a token stand for more)."""
        size = (n_tokens + self.HEAD_SLACK) * self.max_token_chars()
        while size < len(text):
            head = text[:size]
            if self.count_tokens([head])[0] > n_tokens + self.HEAD_SLACK:
                return head
            size *= 2
        return text

    def truncate_tokens(self, text: str, n_tokens: int) -> str:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.tokenizer.decode(ids[:max(0, n_tokens)])


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
    mixes_adapters = False  # generate_stream may receive requests naming different adapters
    # What --model names: "folder" (a local model folder with its tokenizer, read before any weights load),
    # "gold file" (echo: the outputs themselves) or "server" (openai: a served model's name; nothing to start).
    model_source = "folder"
    swaps_checkpoints = False  # --model repeated: full checkpoints loaded into one backend in turn (hf)
    quantizes = False  # --quantize: converts the model's layers at load (hf)

    def decodes_together(self, adapters: list[str], params: GenParams) -> bool:
        """Whether these adapters' requests, interleaved in one stream, decode together (so one pass over the
        corpus for all of them pays off); a backend that can only switch between them says False. The
        pipeline only tags each request with its adapter: which requests decode together is the backend's
        decision (hf: HFBackend._runs)."""
        return self.mixes_adapters

    def expect(self, records: int | None, params: GenParams) -> None:
        """The run decodes at most `records` records (None: unknown); a backend may size its start-up to it."""

    def startup_record(self) -> dict | None:
        """What start-up did and how long each phase took (the manifest's `startup`); None: nothing to say."""
        return None

    def identity(self, adapter: str | None = None) -> dict:
        """What identifies the weights and settings that produce outputs for requests naming `adapter`
        (None: base weights); it goes into the manifest."""
        raise NotImplementedError

    def adapters(self) -> list[str | None]:
        """Adapter names to run, in order; [None] for base weights only."""
        return [None]

    def use_adapter(self, name: str | None) -> None:
        if name is not None:
            raise NotImplementedError(f"backend {self.name} has no adapters")

    def max_input_tokens(self, params: GenParams, adapter: str | None = None) -> int | None:
        return None

    stream_batch = 256  # requests per `generate` call of the default stream, at most (one window's)

    def encoder(self) -> TextEncoder:
        """The pipeline's view of this backend's tokenizer (counts characters here)."""
        return TextEncoder()

    def count_tokens(self, prompts: list[str]) -> list[int]:
        return self.encoder().count_tokens(prompts)

    def generate(self, requests: list[Request], params: GenParams, schema: dict | None = None) -> list[Generation]:
        raise NotImplementedError

    def generate_stream(self, requests: Iterable[Request], params: GenParams, schema: dict | None = None,
                        probes: list[str] = ()) -> Iterator[list[tuple[Request, Generation]]]:
        """Requests in (pulled as the backend is ready for them), lists of (request, generation) out as they
        finish, in any order. This default serves one window's requests (at most `stream_batch`) per `generate`
        call; a backend that keeps its engine busy across them (hf's fast path, vllm) overrides it. probes:
        prompts rendered with placeholder values, marking where the task's shared prefix ends."""
        for batch in by_window(requests, self.stream_batch):
            yield list(zip(batch, self.generate(batch, params, schema)))

    def close(self) -> None:
        pass


class TokenizerBackend(Backend):
    """Backends that hold a transformers tokenizer (hf, vllm): both encode a prompt the same way
    (TokenizerEncoder). Both keep `adapter_paths` by name."""

    adapter_paths: dict = {}
    _text_encoder: TokenizerEncoder | None = None

    def adapters(self) -> list[str | None]:
        return list(self.adapter_paths) or [None]

    def encoder(self) -> TokenizerEncoder:
        if self._text_encoder is None or self._text_encoder.tokenizer is not self.tokenizer:
            self._text_encoder = TokenizerEncoder(self.tokenizer)
        return self._text_encoder

    def _ids(self, request: Request) -> list[int]:
        """The request's token ids: the caller's, or encoded here exactly as the pipeline encodes them."""
        return request.ids if request.ids is not None else self.encoder().encode_batch([request.prompt])[0]


def name_adapters(paths, check) -> dict:
    """Adapter folders by name (the folder's name; a suffix where two share one), each checked first."""
    from pathlib import Path
    named = {}
    for a in paths:
        path = Path(a)
        check(path)
        named[path.name if path.name not in named else f"{path.name}-{len(named)}"] = path
    return named
