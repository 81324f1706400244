"""String normalization for matching facts (the `normalized` match mode)."""
from __future__ import annotations

import re
import unicodedata
from functools import lru_cache
from collections.abc import Callable

_SPACES = re.compile(r"\s+")
_TOKENS = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]|[^\W_]+|[+#]+", re.UNICODE)


def make_normalizer(match: str, strip_punctuation: str = "", strip_book_title: bool = False) -> Callable[[str], str]:
    """exact: identity. normalized: NFKC, case fold, collapse whitespace, strip the configured
    punctuation, and (DuIE) strip one surrounding 《》 pair."""
    if match == "exact":
        return lambda s: s
    table = str.maketrans("", "", unicodedata.normalize("NFKC", strip_punctuation)) if strip_punctuation else None

    @lru_cache(maxsize=1 << 16)  # extracted values repeat a lot across records
    def normalize(s: str) -> str:
        s = unicodedata.normalize("NFKC", s).casefold()
        if table is not None:
            s = s.translate(table)
        s = _SPACES.sub(" ", s).strip()
        if strip_book_title and len(s) >= 2 and s[0] == "《" and s[-1] == "》":
            s = s[1:-1]
        return s

    return normalize


def tokens(text: str) -> list[str]:
    """Tokens for the lenient overlap score: each CJK character, and each run of letters/digits."""
    return _TOKENS.findall(text)
