"""Edit distance in time linear in the text: Myers' bit-parallel algorithm, for the best-matching substring of
a window (fuzzy grounding) and for the distance and similarity of two strings."""
from __future__ import annotations


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
