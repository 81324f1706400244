"""Grounding: where each extracted value occurs in its record's source text, in time linear in the text.

Which values: the string values the task's scoring spec scores — kind `fields`: every string under each
scored field (list elements one by one, an object's values under `field.key`); kind `tuples`: every key field
other than the class field (a predicate names a relation, not a span of text); kind `labels` (and plugin kinds):
none, a label is a class, not text. Empty strings and the task's absent marker are no value, as in scoring.
Numbers and booleans are not grounded: a number's text form ("3") occurs by chance in most postings, and
a model may rightly compute one (a sum, a year) that the text spells otherwise, so its rate would mislead.

How, per value, first hit wins:
- exact: the value as written is a substring of the text;
- normalized: the value's key is a substring of the text's key, where a key is each character's NFKD form,
  case-folded (full/half width, case, compatibility forms), with whitespace, the separators 、，, and the
  task's `strip_punctuation` (and 《》 when `strip_book_title`) removed. The key is built character by
  character, so an index array maps each key character back to the text character it came from;
- fuzzy: the text span whose key is closest to the value's key by edit distance, kept when
  similarity = 1 − distance / max(len(value key), len(span key)) ≥ FUZZY_THRESHOLD (0.8), for value keys of
  FUZZY_MIN_CHARS..FUZZY_MAX_CHARS characters (shorter ones have no room for a typo: one edit in "本科" is
  half the value). Candidate places come from the value's character bigrams found in the text key (each
  bigram's hits capped), voted by diagonal, and filtered by the q-gram lemma (a span within k edits shares
  at least m − 1 − 2k bigrams); the edit-distance table runs only over the few candidate windows of about
  the value's length, never over the whole text.
Exact and normalized hits must not cut a word: a hit whose edge falls between two letters or digits of a
non-CJK script ("go" in "Google", "3年" in "13年") is passed over for the next one, up to MAX_HITS hits (a
text of one letter repeated cannot make a long value cost its length per character). Chinese has no such
edge.

Each span's offsets are the text's Python string offsets: text[start:end] is the value (exact), has the
value's key (normalized) or a key within the threshold (fuzzy); every candidate is checked that way before
it is returned. A value found nowhere gets start/end/match null; when it also equals (by key) a value of the
task's few-shot outputs, it is flagged `copied_from_prompt`.
"""
from __future__ import annotations

import unicodedata
from bisect import bisect_right
from itertools import accumulate
from collections.abc import Iterator
from dataclasses import dataclass

from extractor.scoring.facts import FactExtractor

EXACT, NORMALIZED, FUZZY = "exact", "normalized", "fuzzy"
MATCHES = (EXACT, NORMALIZED, FUZZY)
SEPARATORS = "、,"  # after NFKD: the full-width ，and the half-width ､ become these
FUZZY_THRESHOLD = 0.8
FUZZY_MIN_CHARS = 5  # below this one edit already falls under the threshold
FUZZY_MAX_CHARS = 256  # the edit-distance table is value length × window: bounded
MAX_HITS = 1000  # exact or normalized hits tried per value (each passed over when it cuts a word)
MAX_BIGRAM_HITS = 512  # per distinct bigram of a value: a hostile text of one repeated pair costs no more
FUZZY_CANDIDATES = 3
CJK_START = "\u2e80"  # CJK radicals onwards: scripts without spaces between words


class KeyTable(dict):
    """Character -> its key text, for str.translate: filled on first sight of each character, so a text's key is
    one C-speed translate after warm-up."""

    def __init__(self, drop: str):
        super().__init__()
        self.drop = frozenset(drop)

    def __missing__(self, code: int) -> str:
        key = "".join(c for c in unicodedata.normalize("NFKD", chr(code)).casefold()
                      if c not in self.drop and not c.isspace())
        self[code] = key
        return key

    def key(self, s: str) -> str:
        return s.translate(self)


@dataclass(frozen=True, order=True)
class Span:
    start: int
    end: int
    match: str


class _Text:
    """One record's text with its key and its key -> text offset map, each built once, on first need."""

    def __init__(self, text: str, table: KeyTable):
        self.text, self.table = text, table
        self._key: str | None = None
        self._ends: list[int] | None = None

    @property
    def key(self) -> str:
        if self._key is None:
            self._key = self.table.key(self.text)
        return self._key

    def to_text(self, start: int, end: int) -> tuple[int, int]:
        """Text offsets of the key slice [start, end): from the first key character's source character to
        the last one's. ends[i] is the key's length after text character i (one C-level pass)."""
        if self._ends is None:
            self._ends = list(accumulate(map(len, map(self.table.__getitem__, map(ord, self.text)))))
        return bisect_right(self._ends, start), bisect_right(self._ends, end - 1) + 1


class Aligner:
    """Finds one value in one text: exact, then normalized, then fuzzy (see the module's docstring)."""

    def __init__(self, strip: str = ""):
        self.table = KeyTable(SEPARATORS + strip)
        self._words: dict[str, bool] = {}

    def text(self, text: str) -> _Text:
        return _Text(text, self.table)

    def key(self, s: str) -> str:
        return self.table.key(s)

    def locate(self, text: _Text, value: str) -> Span | None:
        if not value:
            return None
        span = self._exact(text.text, value)
        if span is not None:
            return span
        vkey = self.key(value)
        if not vkey:
            return None
        return self._normalized(text, vkey) or self._fuzzy(text, vkey)

    def _wordy(self, ch: str) -> bool:
        """A letter or digit of a script that spaces its words (not CJK): a hit must not split a run of them."""
        w = self._words.get(ch)
        if w is None:
            k = self.table[ord(ch)]
            w = self._words[ch] = bool(k) and k[0] < CJK_START and k[0].isalnum()
        return w

    def _cuts_word(self, s: str, start: int, end: int) -> bool:
        return ((0 < start and self._wordy(s[start - 1]) and self._wordy(s[start]))
                or (end < len(s) and self._wordy(s[end - 1]) and self._wordy(s[end])))

    def _exact(self, s: str, value: str) -> Span | None:
        i = s.find(value)
        for _ in range(MAX_HITS):
            if i < 0:
                break
            if not self._cuts_word(s, i, i + len(value)):
                return Span(i, i + len(value), EXACT)
            i = s.find(value, i + 1)
        return None

    def _normalized(self, text: _Text, vkey: str) -> Span | None:
        key = text.key
        i = key.find(vkey)
        for _ in range(MAX_HITS):
            if i < 0:
                break
            start, end = text.to_text(i, i + len(vkey))
            # A hit starting or ending inside one character's expansion ("ﬁ" -> "fi") is no slice of the text.
            if self.key(text.text[start:end]) == vkey and not self._cuts_word(text.text, start, end):
                return Span(start, end, NORMALIZED)
            i = key.find(vkey, i + 1)
        return None

    def _fuzzy(self, text: _Text, vkey: str) -> Span | None:
        m = len(vkey)
        if not FUZZY_MIN_CHARS <= m <= FUZZY_MAX_CHARS:
            return None
        key = text.key
        k = int(m * (1 - FUZZY_THRESHOLD) / FUZZY_THRESHOLD)  # most edits a span within the threshold has
        best: tuple[float, int, int] | None = None
        for lo in _candidates(key, vkey, k):
            window_start = max(0, lo - k)
            window = key[window_start:lo + m + k]
            dist, s, e = best_substring(vkey, window)
            if e > s:
                sim = similarity_of(dist, m, e - s)
                if sim >= FUZZY_THRESHOLD and (best is None or sim > best[0]):
                    best = (sim, window_start + s, window_start + e)
        if best is None:
            return None
        start, end = text.to_text(best[1], best[2])
        if similarity(vkey, self.key(text.text[start:end])) < FUZZY_THRESHOLD:
            return None
        return Span(start, end, FUZZY)


def _candidates(key: str, vkey: str, k: int) -> list[int]:
    """Text-key offsets where vkey may start, at most FUZZY_CANDIDATES, best supported first.

    Each hit of a value bigram at text offset p and value offset o votes for a start at p − o; a start is a
    candidate when the votes within k of it reach the q-gram lemma's bound. O(len(key) · bigrams) scanning in
    C (str.find), O(bigrams · MAX_BIGRAM_HITS) in Python."""
    m = len(vkey)
    need = max(1, m - 1 - 2 * k)
    starts: list[int] = []
    seen: set[str] = set()
    for o in range(m - 1):
        gram = vkey[o:o + 2]
        if gram in seen:
            continue
        seen.add(gram)
        offsets = [j for j in range(o, m - 1) if vkey[j:j + 2] == gram]
        p, hits = key.find(gram), 0
        while p >= 0 and hits < MAX_BIGRAM_HITS:
            starts.extend(p - j for j in offsets)
            hits += 1
            p = key.find(gram, p + 1)
    if len(starts) < need:
        return []
    starts.sort()
    scored = []
    right = 0
    for left, d in enumerate(starts):  # votes in [d, d + 2k]: a window around the start d + k
        while right < len(starts) and starts[right] <= d + 2 * k:
            right += 1
        if right - left >= need:
            scored.append((right - left, d + k))
    scored.sort(key=lambda t: -t[0])
    picked: list[int] = []
    for _, at in scored:
        if all(abs(at - p) > k for p in picked):
            picked.append(at)
            if len(picked) == FUZZY_CANDIDATES:
                break
    return picked


def best_substring(pattern: str, window: str) -> tuple[int, int, int]:
    """(distance, start, end) of the shortest substring of window with the least edit distance to pattern.

    Myers' bit-parallel search (one machine-word-like step per window character, the pattern's column held in
    an int): first with a free start, for the best end; then the reversed pattern over the reversed prefix
    with an anchored start, for the start. O(len(window)) big-int steps of len(pattern) bits."""
    dist, end, _ = _myers(pattern, window, anchored=False)
    _, length, _ = _myers(pattern[::-1], window[:end][::-1], anchored=True, target=dist)
    return dist, end - length, end


def _myers(pattern: str, text: str, anchored: bool, target: int = -1) -> tuple[int, int, int]:
    """(least distance, the first text end reaching it, the distance at the text's end) of pattern against
    text[?:end]; with `anchored` the substring starts at 0, and the scan stops at the first end whose distance
    is `target`."""
    m = len(pattern)
    if m == 0:
        return 0, 0, 0 if not anchored else len(text)
    peq: dict[str, int] = {}
    for i, c in enumerate(pattern):
        peq[c] = peq.get(c, 0) | (1 << i)
    full, high = (1 << m) - 1, 1 << (m - 1)
    pv, mv, score = full, 0, m
    best, best_end = m, 0
    carry = 1 if anchored else 0
    for j, c in enumerate(text, 1):
        eq = peq.get(c, 0)
        xv = eq | mv
        xh = (((eq & pv) + pv) ^ pv) | eq
        ph = mv | (~(xh | pv) & full)
        mh = pv & xh
        if ph & high:
            score += 1
        elif mh & high:
            score -= 1
        ph = ((ph << 1) | carry) & full
        mh = (mh << 1) & full
        pv = mh | (~(xv | ph) & full)
        mv = ph & xv
        if score < best:
            best, best_end = score, j
        if score == target:
            return score, j, score
    return best, best_end, score


def levenshtein(a: str, b: str) -> int:
    return _myers(a, b, anchored=True)[2]


def similarity_of(distance: int, m: int, n: int) -> float:
    longest = max(m, n)
    return 1.0 - distance / longest if longest else 0.0


def similarity(a: str, b: str) -> float:
    return similarity_of(levenshtein(a, b), len(a), len(b))


class Grounder:
    """A task's grounding: which values an output holds (`values`), their spans in a text (`ground`), and per
    distinct (field, scoring key) whether any was grounded (`summarize`, also over spans read from a file)."""

    def __init__(self, task):
        spec = self.spec = task.spec.scoring
        self.kind = spec.kind
        self.facts = FactExtractor(task)
        strip = spec.strip_punctuation + ("《》" if spec.strip_book_title else "")
        self.aligner = Aligner(strip)
        self.fields = list(spec.fields or []) if self.kind == "fields" else (
            [k for k in spec.key_fields or [] if k != spec.class_field] if self.kind == "tuples" else [])
        self.prompt_keys = self._prompt_keys(task)

    @property
    def active(self) -> bool:
        """Whether this task has any value to ground (kind labels, or a plugin kind: none)."""
        return bool(self.fields)

    def _prompt_keys(self, task) -> frozenset[str]:
        keys = set()
        for shot in task.spec.few_shot:
            keys.update(self.aligner.key(v) for _, v in self.values(shot.output))
        keys.discard("")
        return frozenset(keys)

    def _is_value(self, v) -> bool:
        if not isinstance(v, str):
            return False
        key = self.facts.norm(v)
        return bool(key) and key != self.facts.absent

    def values(self, obj) -> Iterator[tuple[str, str]]:
        """(field, value) for each string value to ground, in the output's order."""
        if self.kind == "fields" and isinstance(obj, dict):
            for field in self.fields:
                value = obj.get(field)
                if isinstance(value, list) and all(type(v) is str for v in value):  # the usual shape
                    yield from ((field, v) for v in value if self._is_value(v))
                else:
                    yield from self._walk(field, value)
        elif self.kind == "tuples" and isinstance(obj, list):
            cf = self.spec.class_field
            for item in obj:
                if isinstance(item, dict) and isinstance(item.get(cf), str):
                    for field in self.fields:
                        if self._is_value(item.get(field)):
                            yield field, item[field]

    def _walk(self, field: str, value) -> Iterator[tuple[str, str]]:
        """Depth first, in order, with a stack: a hostile nesting depth cannot exhaust recursion."""
        stack = [(field, value)]
        while stack:
            cls, v = stack.pop()
            if isinstance(v, str):
                if self._is_value(v):
                    yield cls, v
            elif isinstance(v, list):
                stack.extend((cls, x) for x in reversed(v))
            elif isinstance(v, dict):
                stack.extend((f"{cls}.{k}", x) for k, x in reversed(list(v.items())))

    def ground(self, text: str, obj) -> dict[str, list[dict]]:
        """The row's `spans`: per field, one entry per value in order (see the module's docstring)."""
        spans: dict[str, list[dict]] = {}
        if not isinstance(text, str):
            return spans
        t = self.aligner.text(text)
        found: dict[str, Span | None] = {}
        for field, value in self.values(obj):
            if value not in found:
                found[value] = self.aligner.locate(t, value)
            spans.setdefault(field, []).append(self._entry(value, found[value]))
        return spans

    def _entry(self, value: str, span: Span | None) -> dict:
        if span is not None:
            return {"value": value, "start": span.start, "end": span.end, "match": span.match}
        entry = {"value": value, "start": None, "end": None, "match": None}
        if self.aligner.key(value) in self.prompt_keys:
            entry["copied_from_prompt"] = True
        return entry

    def locate(self, text: str, value: str) -> Span | None:
        return self.aligner.locate(self.aligner.text(text), value)

    def from_spans(self, obj, spans: dict) -> dict[str, list[dict]]:
        """Spans read with a row, fitted to the output's values now (after --reparse they may be stale): each
        value takes the row's entry for it, or none found."""
        given = {(f, e["value"]): e for f, entries in spans.items() for e in entries}
        out: dict[str, list[dict]] = {}
        for field, value in self.values(obj):
            e = given.get((field, value))
            out.setdefault(field, []).append(e if e is not None else self._entry(value, None))
        return out

    def locate_fact(self, fact, text: str) -> list[Span]:
        """Where a scored fact (class, key) shows in a text: a field value's key, or each grounded part of a
        tuple; numbers and booleans are not looked for."""
        cls, key = fact
        t = self.aligner.text(text)
        if self.kind == "fields" and isinstance(key, str):
            parts = [key]
        elif self.kind == "tuples" and isinstance(key, tuple):
            key_fields = self.spec.key_fields or []
            parts = [key[i] for i, k in enumerate(key_fields) if k in self.fields and i < len(key) and key[i]]
        else:
            return []
        found = (self.aligner.locate(t, p) for p in parts)
        return sorted(s for s in found if s is not None)

    def summarize(self, spans: dict) -> tuple[dict[tuple[str, object], "Grounded"], dict[tuple[str, object], str]]:
        """Per distinct (field, scoring key) in one record: whether any of its values was grounded, and how;
        and one value as written for each."""
        out: dict[tuple[str, object], Grounded] = {}
        written: dict[tuple[str, object], str] = {}
        for field, entries in spans.items():
            for entry in entries:
                key = (field, self.facts.norm(entry["value"]))
                g = Grounded(entry["match"], bool(entry.get("copied_from_prompt")))
                old = out.get(key)
                if old is None or (old.match is None and g.match is not None):
                    out[key] = g
                    written.setdefault(key, entry["value"])
        return out, written

    def grounded_facts(self, facts: set, summary: dict) -> dict:
        """Each predicted fact -> grounded or not: a field value by its own key; a tuple when every grounded
        field of it (subject, object) was found."""
        if self.kind == "fields":
            return {f: (f in summary and summary[f].match is not None) for f in facts}
        if self.kind != "tuples":
            return {}
        key_fields = self.spec.key_fields or []
        where = [(i, k) for i, k in enumerate(key_fields) if k in self.fields]
        out = {}
        for cls, key in facts:
            hits = [summary.get((k, key[i])) for i, k in where]
            out[(cls, key)] = bool(hits) and all(h is not None and h.match is not None for h in hits)
        return out


@dataclass(frozen=True)
class Grounded:
    match: str | None
    copied: bool


def check_spans(spans, where: str) -> dict:
    """A `spans` object read from a file, checked: {field: [{value: str, match: kind|null, ...}]}; else a
    ValueError naming what is wrong."""
    if not isinstance(spans, dict):
        raise ValueError(f"{where}: spans must be an object of field -> list, got {type(spans).__name__}")
    for field, entries in spans.items():
        if not isinstance(entries, list):
            raise ValueError(f"{where}: spans.{field} must be a list, got {type(entries).__name__}")
        for i, e in enumerate(entries):
            if (not isinstance(e, dict) or not isinstance(e.get("value"), str)
                    or (e.get("match") is not None and e.get("match") not in MATCHES)):
                raise ValueError(f"{where}: spans.{field}[{i}] must be {{value: string, start, end, match: "
                                 f"{'|'.join(MATCHES)}|null}}")
    return spans
