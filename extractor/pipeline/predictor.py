"""Records -> output rows for one task and backend: render (few-shot, long-input policy), tokenize, generate
(streamed, put back in input order), judge. Shared by `extractor run` and training's F1 evaluation."""
from __future__ import annotations

from dataclasses import dataclass, field

from extractor.backends.base import Backend, GenParams, Generation
from extractor.errors import InputError, LongInputError
from extractor.results.judge import ERROR, REPAIRED, SCHEMA_VIOLATION, SCORED_STATUSES, OK, Parsed, Validator, judge
from extractor.pipeline.chunks import Chunk, Chunker, ChunkSettings
from extractor.pipeline.lanes import stream_lanes
from extractor.pipeline.merge import Merger
from extractor.tasks.prompting import PromptBuilder
from extractor.results.rows import chunked_row, error_row, keep_fields, prediction_row
from extractor.scoring.grounding import Grounder


# The row field that flags a record whose text --on-long truncate cut to fit the limit (absent otherwise),
# and the record key that carries the cut from rendering to the row.
INPUT_TRUNCATED = "input_truncated"
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


class Predictor:
    """Records -> output rows for one task and backend. Shared by `run` and by training's F1 evaluation."""

    def __init__(self, task, backend: Backend, params: GenParams, on_long: str = "fail",
                 max_input_tokens: int | None = None, keep_fields: tuple = (), few_shot: int | None = None,
                 adapter_key: str | None = None, chunking: ChunkSettings | None = None):
        if on_long not in LONG_POLICIES:
            raise InputError(f"on_long '{on_long}' is none of {', '.join(LONG_POLICIES)}")
        self.task = task
        self.backend = backend
        self.params = params
        self.builder = PromptBuilder(task, backend.tokenizer, few_shot)
        self.encoder = backend.encoder()  # token counts and ids, taken once: no calls back into the backend
        self.validator = Validator(task.schema, task.registry)
        self.grounder = Grounder(task)  # each row's `spans`: where its values are in the record's text
        self.on_long = on_long
        self.adapter_key = adapter_key  # the backend's name of the adapter, sent with every request
        self.limit = max_input_tokens or backend.max_input_tokens(params, adapter_key)
        self.keep_fields = keep_fields
        self.adapter: str | None = None  # the label output rows carry
        # Chunk settings: the caller's (the command line's over the task's), else the task file's.
        spec = task.spec
        self.chunking = chunking or ChunkSettings(spec.chunk_tokens, spec.chunk_overlap if spec.chunk_overlap
                                                  is not None else ChunkSettings().overlap)
        self.merger = Merger(task)
        self.chunker = Chunker(self.builder, self.encoder, spec.input_fields[0], self.limit, self.chunking) \
            if on_long == "chunk" and self.limit is not None else None
        if params.constrained:
            if not backend.supports_constrained:
                raise InputError(f"backend '{backend.name}' does not support --constrained")
            from extractor.constrain.grammar import check_expressible
            check_expressible(task.schema)

    def predict(self, records: list[dict]) -> list[dict]:
        """Output rows for one batch of records, in order (training's evaluation, Ray workers)."""
        return [row for triples in self.stream([records]) for row in self.rows(triples)]

    def stream(self, windows):
        """Windows of records in; lists of (record, generation, skip_reason) out, in input order, as the
        backend finishes them (a chunked record's generation: the list of its chunks', once all are back;
        rows are built from these by `rows`, off the generating thread). The backend
        pulls requests one at a time, so it may work on several windows at once (hf's fast path keeps its
        slots full across windows); each window is rendered and tokenized in one call as it is reached."""
        for _, triples in stream_lanes([self], ((records, [records]) for records in windows)):
            yield triples

    def render(self, records: list[dict]) -> Rendered:
        """One window's prompts (under the long-input policy) and their token ids, tokenized in one call."""
        rendered = self._prompts(records)
        rendered.ids = self._token_ids(rendered.prompts, rendered.skipped)
        return rendered

    def _token_ids(self, prompts: list[list[str]], skipped: dict) -> list:
        """Prompt token ids, encoded here in one batched call per window for backends that take them (the
        backend then encodes nothing itself); None where the backend encodes itself."""
        todo = [(i, k) for i in range(len(prompts)) if i not in skipped for k in range(len(prompts[i]))]
        encoded = self.encoder.encode_batch([prompts[i][k] for i, k in todo])
        ids: list = [[None] * len(p) for p in prompts]
        for (i, k), e in zip(todo, encoded or ()):
            ids[i][k] = e
        return ids

    def rows(self, triples) -> list[dict]:
        return [self._row(rec, gen, skip) for rec, gen, skip in triples]

    def probes(self) -> list[str]:
        """The prompt rendered with placeholder values: where they differ, the task's shared prefix ends."""
        fields = self.task.spec.input_fields
        return [self.builder.build({f: probe for f in fields}) for probe in ("0", "A", "中", "{", " x")]

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
            if self.on_long == "fail":
                raise LongInputError(f"{message}; pass --on-long chunk, truncate or skip, or raise "
                                     "--max-input-tokens")
            if self.on_long == "skip":
                rendered.skipped[i] = f"{message}; skipped (--on-long skip)"
            elif self.on_long == "chunk":
                rendered.chunks[i], rendered.prompts[i] = self.chunker.chunks(records[i])
            else:
                rendered.prompts[i] = [self._truncate(records[i], n)]
                # Noted on the record per limit: lanes of other limits share the record, not its cut.
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

    def _row(self, rec: dict, gen, skip_reason: str | None) -> dict:
        if isinstance(gen, list):
            row = self._chunked_row(rec, gen)
        elif gen is None or gen.error:
            row = error_row(rec["id"], self.task.name, skip_reason or gen.error, self.adapter,
                            gen.prompt_tokens if gen else None)
        else:
            row = prediction_row(rec["id"], self.task.name, gen, judge(gen.text, gen.finish_reason, self.validator),
                                 self.adapter)
        if self.grounder.active and row["status"] in SCORED_STATUSES:
            row["spans"] = self.grounder.ground(rec["values"][self.task.spec.input_fields[0]], row["prediction"])
        if self.limit in rec.get(TRUNCATED_AT, ()):
            row[INPUT_TRUNCATED] = True
        return keep_fields(row, rec["row"], self.keep_fields)

    def _chunked_row(self, rec: dict, gens: list[Generation]) -> dict:
        """One row from a record's chunks: each judged, the scored ones merged (merge.py) and the merge judged
        against the schema; where no chunk has a scored prediction, the first chunk's outcome is the row's."""
        parsed = [Parsed(None, ERROR, g.error) if g.error else judge(g.text, g.finish_reason, self.validator)
                  for g in gens]
        scored = [p for p in parsed if p.status in SCORED_STATUSES]
        if not scored:
            first = parsed[0]
            outcome = Parsed(first.prediction, first.status, f"chunk 1 of {len(gens)}: {first.error}")
            return chunked_row(rec["id"], self.task.name, gens, parsed, outcome, {}, self.adapter, own=0)
        merged, conflicts = self.merger.merge([p.prediction for p in scored])
        error = self.validator.first_error(merged)
        if error is not None:
            outcome = Parsed(merged, SCHEMA_VIOLATION, f"the merged chunks' prediction: {error}")
        else:
            outcome = Parsed(merged, REPAIRED if any(p.status == REPAIRED for p in scored) else OK)
        return chunked_row(rec["id"], self.task.name, gens, parsed, outcome, conflicts, self.adapter)
