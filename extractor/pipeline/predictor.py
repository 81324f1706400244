"""Records -> rows in one call, for callers that hold records rather than a corpus and an output (training's
dev F1, Ray's actors, benches): one lane (a `Renderer`, a `RowJudge`) through the backend's stream, judged as
the stream releases it. `extractor run` does not use it: its records are read by `one_pass.OnePass` and its
rows judged on the writer thread."""
from __future__ import annotations

from extractor.backends.base import Backend, GenParams
from extractor.pipeline.lanes import Lane, stream_lanes
from extractor.pipeline.options import RunOptions


class Predictor:
    """`settings` are `RunOptions` fields by name (on_long=, max_input_tokens=, keep_fields=, few_shot=,
    chunking=): they are carried by a RunOptions of their own, as a run's are. Requests name `adapter_key`
    (the backend's name of an adapter; None: the base weights); rows carry `label`."""

    def __init__(self, task, backend: Backend, params: GenParams, adapter_key: str | None = None,
                 label: str | None = None, **settings):
        self.task, self.backend = task, backend
        self.opts = RunOptions(corpus=None, out=None, params=params, **settings)
        self.adapter_key = adapter_key
        lane = Lane.build(task, backend, self.opts, adapter_key, label)
        self.renderer, self.judge = lane.renderer, lane.judge

    @property
    def params(self) -> GenParams:
        return self.opts.params

    def lane(self) -> Lane:
        """The lane of this predictor's requests (naming its adapter as it is now: a bench switches it)."""
        return Lane(self.renderer, self.judge, self.adapter_key)

    def predict(self, records: list[dict]) -> list[dict]:
        """Output rows for one batch of records, in order."""
        stream = stream_lanes(self.backend, self.params, self.task.constraint_schema, [self.lane()], [(records, [records])])
        return [row for _, triples in stream for row in self.judge.rows(triples)]

    # The renderer's, for callers that look at the prompts themselves (tests, --on-long benches).
    def render(self, records: list[dict]):
        return self.renderer.render(records)

    def probes(self) -> list[str]:
        return self.renderer.probes()

    @property
    def builder(self):
        return self.renderer.builder

    @property
    def chunker(self):
        return self.renderer.chunker

    @property
    def limit(self) -> int | None:
        return self.renderer.limit

    @property
    def encoder(self):
        return self.renderer.encoder

    @encoder.setter
    def encoder(self, encoder) -> None:  # a test's reference counts every prompt whole
        self.renderer.encoder = encoder
