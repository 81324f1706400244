"""Records -> requests for one prompt limit: each record's prompt (the task's template and few-shot turns), the
long-input policy applied to it (`fail`, `truncate`, `skip`, `chunk`), and the token ids of every prompt of a
window, encoded in one call. It keeps no backend: what it needs of one (the tokenizer, an encoder, the limit
for the adapter its requests name) is taken when it is built."""
from __future__ import annotations

from dataclasses import dataclass, field

from extractor.backends.base import Backend
from extractor.errors import InputError, LongInputError
from extractor.pipeline.chunks import Chunk, Chunker, ChunkSettings
from extractor.pipeline.options import RunOptions
from extractor.tasks.prompting import PromptBuilder

# The record key that carries a --on-long truncate cut from rendering to the row: the limits it was cut to
# (lanes of other limits share the record, not its cut).
TRUNCATED_AT = "truncated_at"
LONG_POLICIES = ("fail", "truncate", "skip", "chunk")


@dataclass
class Rendered:
    """One window's requests: each record's prompts (one, or one per chunk under --on-long chunk) and their
    token ids (None where the backend encodes itself), the records skipped (index -> why) and the chunks of
    each chunked record (index -> where in its text each chunk is)."""

    prompts: list[list[str]]
    ids: list[list]
    skipped: dict[int, str] = field(default_factory=dict)
    chunks: dict[int, list[Chunk]] = field(default_factory=dict)


class Renderer:
    """One task's prompts under one run's settings, for requests naming `adapter_key` (its prompt limit:
    --max-input-tokens, else the backend's for that adapter)."""

    def __init__(self, task, backend: Backend, opts: RunOptions, adapter_key: str | None = None):
        if opts.on_long not in LONG_POLICIES:
            raise InputError(f"on_long '{opts.on_long}' is none of {', '.join(LONG_POLICIES)}")
        self.task, self.opts = task, opts
        self.builder = PromptBuilder(task, backend.tokenizer, opts.few_shot)
        self.encoder = backend.encoder()  # token counts and ids, taken once: no calls back into the backend
        self.limit = opts.max_input_tokens or backend.max_input_tokens(opts.params, adapter_key)
        spec = task.spec  # the run's chunk settings (the command line's over the task's), else the task file's
        self.chunking = opts.chunking or ChunkSettings(spec.chunk_tokens, spec.chunk_overlap if spec.chunk_overlap
                                                       is not None else ChunkSettings().overlap)
        self.chunker = Chunker(self.builder, self.encoder, spec.input_fields[0], self.limit, self.chunking) \
            if opts.on_long == "chunk" and self.limit is not None else None
        check_constrained(task, backend, opts)

    def render(self, records: list[dict]) -> Rendered:
        """One window's prompts (under the long-input policy) and their token ids, tokenized in one call."""
        rendered = self._prompts(records)
        rendered.ids = self._token_ids(rendered.prompts, rendered.skipped)
        return rendered

    def probes(self) -> list[str]:
        """The prompt rendered with placeholder values: where they differ, the task's shared prefix ends."""
        fields = self.task.spec.input_fields
        return [self.builder.build({f: probe for f in fields}) for probe in ("0", "A", "中", "{", " x")]

    def _token_ids(self, prompts: list[list[str]], skipped: dict) -> list:
        """Prompt token ids, encoded here in one batched call per window for backends that take them (the
        backend then encodes nothing itself); None where the backend encodes itself."""
        todo = [(i, k) for i in range(len(prompts)) if i not in skipped for k in range(len(prompts[i]))]
        encoded = self.encoder.encode_batch([prompts[i][k] for i, k in todo])
        ids: list = [[None] * len(p) for p in prompts]
        for (i, k), e in zip(todo, encoded or ()):
            ids[i][k] = e
        return ids

    def _prompts(self, records: list[dict]) -> Rendered:
        prompts = [self.builder.build(r["values"], where=f"record {r['id']}") for r in records]
        rendered = Rendered([[p] for p in prompts], [])
        if self.limit is None:
            return rendered
        # A prompt over the limit is counted only on a head of it: a 50 MB record costs no more than its
        # first few limits' worth of text.
        lengths = self.encoder.count_tokens_upto(prompts, self.limit)
        for i, (n, whole) in enumerate(lengths):
            if n <= self.limit:
                continue
            message = (f"record {records[i]['id']}: prompt has {'' if whole else 'more than '}{n} tokens, more "
                       f"than the limit {self.limit}")
            if self.opts.on_long == "fail":
                raise LongInputError(f"{message}; pass --on-long chunk, truncate or skip, or raise "
                                     "--max-input-tokens")
            if self.opts.on_long == "skip":
                rendered.skipped[i] = f"{message}; skipped (--on-long skip)"
            elif self.opts.on_long == "chunk":
                rendered.chunks[i], rendered.prompts[i] = self.chunker.chunks(records[i])
            else:
                rendered.prompts[i] = [self._truncate(records[i], n)]
                records[i].setdefault(TRUNCATED_AT, set()).add(self.limit)
        return rendered

    def _truncate(self, record: dict, n_tokens: int) -> str:
        """Cut the record's first input field until the whole prompt fits the limit."""
        field0 = self.task.spec.input_fields[0]
        values = dict(record["values"])
        head = self.encoder.head(values[field0], self.limit)  # the most of it the prompt could keep
        if len(head) < len(values[field0]):
            values[field0] = head
            n_tokens = self.encoder.count_tokens([self.builder.build(values)])[0]
        over = n_tokens - self.limit
        for _ in range(4):
            text_tokens = self.encoder.count_tokens([values[field0]])[0]
            values[field0] = self.encoder.truncate_tokens(values[field0], text_tokens - over - 2)
            prompt = self.builder.build(values)
            over = self.encoder.count_tokens_upto([prompt], self.limit)[0][0] - self.limit
            if over <= 0:
                return prompt
        raise LongInputError(f"record {record['id']}: the prompt without its text is already longer than "
                             f"{self.limit} tokens; raise --max-input-tokens or shorten the task's prompt")


def check_constrained(task, backend: Backend, opts: RunOptions) -> None:
    """--constrained needs a backend that constrains and a schema its grammar can express: said before any
    record is rendered."""
    if not opts.params.constrained:
        return
    if not backend.supports_constrained:
        raise InputError(f"backend '{backend.name}' does not support --constrained")
    from extractor.constrain.grammar import check_expressible
    check_expressible(task.constraint_schema)
