"""SkillSpan (Zhang et al., NAACL 2022) BIO lines -> corpus and gold records for the `skills` task.

Input lines: {"idx", "tokens", "tags_skill", "tags_knowledge", "source"}. Each sentence becomes
{"id", "text"} (tokens joined by spaces) and {"id", "gold": {"skills": [...], "knowledge": [...]}}, spans
being the tokens of each B/I run joined by spaces, so every gold span occurs verbatim in the text.
"""
from __future__ import annotations

from pathlib import Path

from extractor import jsonutil
from extractor.errors import InputError
from extractor.store.writers import iter_jsonl_rows


def bio_spans(tokens: list[str], tags: list[str]) -> list[str]:
    spans, current = [], []
    for token, tag in zip(tokens, tags):
        if tag.startswith("B"):
            if current:
                spans.append(" ".join(current))
            current = [token]
        elif tag.startswith("I") and current:
            current.append(token)
        else:
            if current:
                spans.append(" ".join(current))
            current = []
    if current:
        spans.append(" ".join(current))
    return spans


def convert(src: Path, corpus_out: Path, gold_out: Path) -> int:
    count = 0
    with open(corpus_out, "w", encoding="utf-8") as cf, open(gold_out, "w", encoding="utf-8") as gf:
        for line, row in iter_jsonl_rows(src):
            tokens = row.get("tokens")
            tags_s, tags_k = row.get("tags_skill"), row.get("tags_knowledge")
            if not (isinstance(tokens, list) and isinstance(tags_s, list) and isinstance(tags_k, list)
                    and len(tokens) == len(tags_s) == len(tags_k)):
                raise InputError(f"{src}:{line}: expected tokens, tags_skill and tags_knowledge lists of equal "
                                 "length (SkillSpan JSON lines)")
            rid = f"{row.get('idx', 0)}-{line}"
            cf.write(jsonutil.dumps({"id": rid, "text": " ".join(tokens), "source": row.get("source")}) + "\n")
            gold = {"skills": bio_spans(tokens, tags_s), "knowledge": bio_spans(tokens, tags_k)}
            gf.write(jsonutil.dumps({"id": rid, "gold": gold}) + "\n")
            count += 1
    return count
