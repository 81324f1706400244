"""The most frequent errors of one class, each with one record's id and a window of its text with the values
marked: false positives and negatives by key, wrong values as (predicted, expected) pairs."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from extractor.scoring.alignment import Span

SNIPPET_CHARS = 160
CONTEXT_CHARS = 60  # text kept before a highlighted span
MAX_SPAN_CHARS = 400


@dataclass
class Examples:
    """Most frequent false positives / negatives of one class, with one record id and snippet each."""

    counts: Counter = field(default_factory=Counter)
    where: dict = field(default_factory=dict)
    limit: int = 20_000  # distinct keys tracked per class, so memory stays bounded

    def add(self, key: str, rid: str, text: str | None, locate=None) -> None:
        """locate(): the spans of this key in text, asked only the first time a key is seen."""
        if key in self.counts or len(self.counts) < self.limit:
            self.counts[key] += 1
            if key not in self.where:
                self.where[key] = (rid, *snippet(text or "", locate() if locate and text else []))

    def top(self, k: int) -> list[dict]:
        return [{"key": key, "count": n, "id": self.where[key][0], "snippet": self.where[key][1],
                 "snippet_start": self.where[key][2], "highlights": self.where[key][3]}
                for key, n in self.counts.most_common(k)]


class PairExamples(Examples):
    """Most frequent wrong values of one class: (predicted, expected) as display texts, one record each."""

    def top(self, k: int) -> list[dict]:
        out = super().top(k)
        for x in out:
            x["predicted"], x["expected"] = x.pop("key")
        return out


def snippet(text: str, spans: list[Span]) -> tuple[str, int, list[dict]]:
    """A window of text around the first span (its start, else the text's head), and the spans inside it
    as offsets into the window."""
    if not spans:
        return text[:SNIPPET_CHARS], 0, []
    first = spans[0]
    start = max(0, first.start - CONTEXT_CHARS)
    end = min(len(text), max(start + SNIPPET_CHARS, min(first.end, first.start + MAX_SPAN_CHARS) + CONTEXT_CHARS))
    marks = [{"start": s.start - start, "end": min(s.end, end) - start, "match": s.match}
             for s in spans if s.start >= start and s.start < end]
    return text[start:end], start, marks
