"""`--on-long chunk`: a record whose prompt is over the limit becomes several prompts, one per overlapping
chunk of its text, each rendered with the task's own template (so every chunk's prompt begins with the same
instructions and few-shot turns, and a shared-prefix cache serves all of them).

Splitting: the text is cut into units that end at a boundary, kept with the unit they end: Chinese and
full-width punctuation (。；！？，｡．), ASCII `. ; ! ?` followed by whitespace or the end (so "3.5" and
"node.js" stay whole), and newlines. Units are packed greedily into chunks of at most `budget` tokens of
text; the next chunk starts with the last units of the one before, as many as fit in `overlap` tokens (at
most half a chunk, and always at least one new unit, so splitting ends). A unit longer than the budget alone
is cut by tokens, at a space where one is near. Every chunk's prompt is then counted whole, and the budget
lowered until each fits the limit.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from extractor.errors import LongInputError

DEFAULT_OVERLAP = 64  # tokens of the previous chunk each chunk repeats
# Tokens kept free below the limit when the budget is derived: a template and a text can merge into tokens
# neither has alone where they meet.
SLACK = 8
_BOUNDARY = re.compile(r"[。；！？，｡．\n]+\s*|[.;!?]+(?:\s+|$)")


@dataclass(frozen=True)
class ChunkSettings:
    """Chunk size in tokens of the record's text (None: as many as fit the limit) and the overlap between
    neighbouring chunks, in tokens."""

    tokens: int | None = None
    overlap: int = DEFAULT_OVERLAP

    def as_dict(self) -> dict:
        return {"tokens": self.tokens, "overlap": self.overlap}


@dataclass(frozen=True)
class Chunk:
    """One chunk of a record's text: text[start:end] of the field it was cut from."""

    start: int
    end: int


def units(text: str) -> list[str]:
    """The text cut after every boundary; the pieces joined give the text back."""
    out, start = [], 0
    for match in _BOUNDARY.finditer(text):
        out.append(text[start:match.end()])
        start = match.end()
    if start < len(text):
        out.append(text[start:])
    return out


def pack(counts: list[int], budget: int, overlap: int) -> list[tuple[int, int]]:
    """Greedy chunks of consecutive units (index ranges [i, j)), each at most `budget` tokens, each after the
    first beginning with the units of its predecessor's end that fit in `overlap` tokens. Every count must be
    at most the budget."""
    chunks: list[tuple[int, int]] = []
    start, n = 0, len(counts)
    while start < n:
        total, end = 0, start
        while end < n and total + counts[end] <= budget:
            total += counts[end]
            end += 1
        chunks.append((start, end))
        if end == n:
            break
        back, repeated = end, 0
        while back - 1 > start and repeated + counts[back - 1] <= overlap:
            repeated += counts[back - 1]
            back -= 1
        while back < end and repeated + counts[end] > budget:  # room for at least one new unit
            repeated -= counts[back]
            back += 1
        start = back
    return chunks


class Splitter:
    """Cuts texts into chunks of at most `budget` tokens, as one encoder counts them."""

    def __init__(self, encoder):
        self.encoder = encoder
        self._base = encoder.count_tokens([""])[0]  # special tokens an encoding of any text carries

    def count(self, texts: list[str]) -> list[int]:
        return [max(0, n - self._base) for n in self.encoder.count_tokens(texts)] if texts else []

    def split(self, text: str, budget: int, overlap: int) -> list[Chunk]:
        pieces: list[str] = []
        counts: list[int] = []
        parts = units(text)
        for unit, n in zip(parts, self.count(parts)):
            for piece, m in ([(unit, n)] if n <= budget else self._hard_split(unit, n, budget)):
                pieces.append(piece)
                counts.append(m)
        offsets = [0]
        for piece in pieces:
            offsets.append(offsets[-1] + len(piece))
        return [Chunk(offsets[i], offsets[j]) for i, j in pack(counts, budget, overlap)]

    def _hard_split(self, unit: str, n: int, budget: int) -> list[tuple[str, int]]:
        """A unit of `n` tokens with no boundary inside the budget, cut into pieces of at most `budget` tokens
        (at a space in a piece's final fifth where there is one: English words stay whole). Each piece is
        counted a few times at most, so a long unit costs about one count of itself."""
        out = []
        width = max(1, len(unit) * budget // max(n, 1))  # characters a budget's worth of tokens spans here
        pos = 0
        while pos < len(unit):
            size = width
            count = self.count([unit[pos:pos + size]])[0]
            while count > budget and size > 1:
                size = max(1, min(size - 1, size * budget // (count + 1)))
                count = self.count([unit[pos:pos + size]])[0]
            if pos + size < len(unit):
                space = unit.rfind(" ", pos + size * 4 // 5, pos + size)
                if space > pos:
                    size = space + 1 - pos
                    count = self.count([unit[pos:pos + size]])[0]
            out.append((unit[pos:pos + size], count))
            pos += size
        return out


class Chunker:
    """A record's prompts under `--on-long chunk`: its first input field split into chunks whose prompts,
    rendered with the task's template, each fit the limit."""

    def __init__(self, builder, encoder, field: str, limit: int, settings: ChunkSettings):
        self.builder, self.encoder, self.field = builder, encoder, field
        self.limit, self.settings = limit, settings
        self.splitter = Splitter(encoder)

    def chunks(self, record: dict) -> tuple[list[Chunk], list[str]]:
        """The record's chunks and their prompts, every one within the limit."""
        values = dict(record["values"])
        text = values[self.field]
        room = self._room(record, values)
        budget = room if self.settings.tokens is None else self.settings.tokens
        if budget > room:
            raise LongInputError(f"record {record['id']}: chunk_tokens {self.settings.tokens} does not fit the "
                                 f"limit {self.limit}: the prompt around the text leaves room for {room} tokens "
                                 f"of it; set chunk_tokens (or --chunk-tokens) to at most {room}")
        for _ in range(6):
            chunks = self.splitter.split(text, budget, min(self.settings.overlap, budget // 2))
            prompts = [self.builder.build({**values, self.field: text[c.start:c.end]}) for c in chunks]
            counts = [n for n, _ in self.encoder.count_tokens_upto(prompts, self.limit)]
            over = max(counts) - self.limit
            if over <= 0:
                return chunks, prompts
            budget -= over + SLACK  # a template and a chunk merged into more tokens than counted apart
            if budget < 1:
                break
        raise LongInputError(f"record {record['id']}: no chunk of its text fits the limit {self.limit} beside the "
                             "task's prompt; raise --max-input-tokens or shorten the task's prompt")

    def _room(self, record: dict, values: dict) -> int:
        """Tokens of text a chunk may hold: the limit less the prompt with the field empty, less a slack."""
        bare = self.encoder.count_tokens([self.builder.build({**values, self.field: ""})])[0]
        room = self.limit - bare - SLACK
        if room < 1:
            raise LongInputError(f"record {record['id']}: the prompt without its text is already {bare} tokens, "
                                 f"over the limit {self.limit} less a slack of {SLACK}; raise --max-input-tokens "
                                 "or shorten the task's prompt")
        return room
