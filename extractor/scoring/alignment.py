"""Finding one value in one text, in time linear in the text.

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
it is returned.
"""
from __future__ import annotations

import unicodedata
from bisect import bisect_right
from dataclasses import dataclass
from itertools import accumulate

from extractor.scoring.edit_distance import best_substring, similarity, similarity_of

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
