"""Several outputs' requests (one lane per output, one adapter each) through one backend stream.

Each reading window's records are rendered and tokenized once per prompt limit the lanes have (LoRA adapters
all share the base's; a prompt-learning adapter's virtual tokens lower its own), and requested once per lane
that still needs them, naming that lane's adapter. The backend answers in any order; each lane's results are
put back in the order its records were sent, so every output's rows stay in input order. A record split into
chunks (`--on-long chunk`) is k requests side by side, and one result: released only once all k are back, so
a stream that stops early (Ctrl-C, a kill) leaves no row of a record half done, and --resume redoes it whole.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

from extractor.backends.base import Backend, GenParams, Request
from extractor.pipeline.interrupt import stop_requested
from extractor.pipeline.options import RunOptions
from extractor.pipeline.renderer import Renderer
from extractor.pipeline.row_judge import RowJudge


@dataclass(frozen=True)
class Lane:
    """One output's way through a pass: its records rendered by `renderer` (its prompt limit) and requested
    naming `adapter` (the backend's name for it; None: the base weights); `judge` makes the rows, on the
    writer thread (the stream itself never calls it)."""

    renderer: Renderer
    judge: RowJudge
    adapter: str | None = None

    @classmethod
    def build(cls, task, backend: Backend, opts: RunOptions, adapter: str | None = None,
              label: str | None = None) -> "Lane":
        """The lane whose requests name `adapter` and whose rows carry `label`."""
        renderer = Renderer(task, backend, opts, adapter)
        return cls(renderer, RowJudge(task, opts, renderer.limit, label), adapter)


class InOrder:
    """One lane's results released in the order its records were sent (a stream's come back in any order)."""

    def __init__(self):
        self.waiting: dict[int, tuple] = {}
        self.sent = 0
        self.next = 0

    def send(self) -> int:
        """The position of the next record sent."""
        self.sent += 1
        return self.sent - 1

    def done(self, position: int, item: tuple) -> None:
        self.waiting[position] = item

    def release(self) -> list[tuple]:
        out = []
        while self.next in self.waiting:
            out.append(self.waiting.pop(self.next))
            self.next += 1
        return out

    def drain(self) -> list[tuple]:
        """Whatever is left once the stream has ended, in order."""
        out = [self.waiting.pop(k) for k in sorted(self.waiting)]
        self.next = self.sent
        return out


def stream_lanes(backend: Backend, params: GenParams, schema: dict, lanes: list[Lane],
                 windows: Iterable[tuple[list[dict], list[list[dict]]]]) -> Iterator[tuple[int, list[tuple]]]:
    """windows: (a reading window's records, each lane's share of them) in; (lane, [(record, generation,
    skip_reason)]) out, each lane's in its input order, as the backend finishes them. Every lane's requests go
    through one stream of `backend`, with the same generation settings and schema (the first lane's probes
    tell the backend where the shared prompt prefix ends); the backend pulls requests as it is ready for them."""
    orders = [InOrder() for _ in lanes]
    sent: dict[int, tuple] = {}  # seq -> (lane, position, record, chunk index or None), until its result is back
    parts: dict[tuple[int, int], list] = {}  # (lane, position) of a chunked record -> its chunks' generations
    groups: dict = {}  # lanes by prompt limit: one rendering serves a group
    for index, lane in enumerate(lanes):
        groups.setdefault(lane.renderer.limit, []).append(index)

    def requests():
        seq = 0
        for window, (records, shares) in enumerate(windows):
            if stop_requested():
                return
            # A record's requests go together, one per lane that needs it: any stretch of the stream then
            # names every adapter, which is what lets the backend decode them together (one pass is only
            # chosen where it does: Backend.decodes_together).
            for group_lanes in groups.values():
                renderer = lanes[group_lanes[0]].renderer
                wants = [(lane, {id(r) for r in shares[lane]}) for lane in group_lanes]
                group = [r for r in records if any(id(r) in ids_ for _, ids_ in wants)]
                if not group:
                    continue
                rendered = renderer.render(group)
                for i, rec in enumerate(group):
                    for lane, wanted in wants:
                        if id(rec) not in wanted:
                            continue
                        position = orders[lane].send()
                        if i in rendered.skipped:
                            orders[lane].done(position, (rec, None, rendered.skipped[i]))
                            continue
                        chunked = i in rendered.chunks
                        if chunked:
                            parts[lane, position] = [None] * len(rendered.prompts[i])
                        for k, (prompt, ids) in enumerate(zip(rendered.prompts[i], rendered.ids[i])):
                            sent[seq] = (lane, position, rec, k if chunked else None)
                            yield Request(prompt, rec["id"], ids=ids, seq=seq, adapter=lanes[lane].adapter,
                                          window=window)
                            seq += 1

    def arrived(request, gen) -> None:
        lane, position, rec, k = sent.pop(request.seq)
        if k is None:
            orders[lane].done(position, (rec, gen, None))
            return
        gens = parts[lane, position]
        gens[k] = gen
        if all(g is not None for g in gens):
            del parts[lane, position]
            orders[lane].done(position, (rec, gens, None))

    def released(drain: bool = False):
        for lane, order in enumerate(orders):
            triples = order.drain() if drain else order.release()
            if triples:
                yield lane, triples

    stream = backend.generate_stream(requests(), params, schema, lanes[0].renderer.probes())
    try:
        for pairs in stream:
            for request, gen in pairs:
                arrived(request, gen)
            yield from released()
            if stop_requested():  # Ctrl-C: what is finished and in order is out; the rest is redone on resume
                return
    finally:
        close = getattr(stream, "close", None)  # a generator's clean-up, also when the stream is left early
        if close is not None:
            close()
    yield from released(drain=True)  # records skipped after the last generation
