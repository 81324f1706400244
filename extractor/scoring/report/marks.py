"""A record's text window as HTML with its values in <mark>s: cut at the spans' offsets first and each piece
escaped on its own, so a span can never split an entity or a tag."""
from __future__ import annotations

import html

from extractor.scoring.report.filters import filter_key

ROLE_TEXT = {"pred": "predicted", "gold": "expected"}
MATCH_KINDS = ("exact", "normalized", "fuzzy")


def layered(record: dict) -> str:
    """A record's text window as HTML with every predicted and expected value in a <mark>. Spans may overlap
    (predicted "Acme" inside expected "Acme Corp"): the text is cut at every span edge and each piece marked
    with the roles of the spans covering it (and its classes' `_key`s, to unmark it when another class is
    picked), then escaped on its own. Attributes hold only fixed words and digests."""
    text = str(record.get("snippet", ""))
    errors = record.get("errors") or []
    marks = [h for h in record.get("highlights") or [] if 0 <= int(h["start"]) < int(h["end"]) <= len(text)]
    edges = sorted({0, len(text), *(int(h["start"]) for h in marks), *(int(h["end"]) for h in marks)})
    out = []
    for a, b in zip(edges, edges[1:]):
        piece = html.escape(text[a:b])
        over = [h for h in marks if int(h["start"]) <= a and b <= int(h["end"])]
        if not over:
            out.append(piece)
            continue
        roles = sorted({h["role"] for h in over if h.get("role") in ROLE_TEXT})
        title = "; ".join(f"{ROLE_TEXT[h['role']]}, {h['match']} match" for h in over
                          if h.get("role") in ROLE_TEXT and h.get("match") in MATCH_KINDS)
        keys = " ".join(sorted({filter_key(errors[h["item"]]["class"]) for h in over
                                if isinstance(h.get("item"), int) and 0 <= h["item"] < len(errors)}))
        out.append(f"<mark class='{' '.join(roles)}' title='{title}' data-classes='{keys}'>{piece}</mark>")
    return "".join(out)


def highlighted(example: dict) -> str:
    """An example's text window as HTML, each highlight in a <mark>: cut at the offsets, then each piece
    escaped on its own (escaping first would move the offsets and could split an entity)."""
    text = str(example.get("snippet", ""))
    out, at = [], 0
    for h in sorted(example.get("highlights") or [], key=lambda h: h["start"]):
        start, end = max(at, int(h["start"])), min(len(text), int(h["end"]))
        if end <= start:
            continue
        match = h.get("match") if h.get("match") in MATCH_KINDS else "exact"
        out.append(html.escape(text[at:start]))
        out.append(f"<mark class='{match}' title='{match} match'>{html.escape(text[start:end])}</mark>")
        at = end
    out.append(html.escape(text[at:]))
    return "".join(out)
