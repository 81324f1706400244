"""How a result's numbers and provenance read in the report, HTML and Markdown alike."""
from __future__ import annotations


def score_rows(result: dict) -> list[tuple[str, dict]]:
    rows = list(result["classes"].items())
    rows.append(("micro", result["micro"]))
    rows.append(("macro", result["macro"]))
    rows.append(("weighted", result["weighted"]))
    return rows


def number(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def rate(v) -> str:
    return "—" if v is None else f"{v:.4f}"


def prov_text(prov: dict) -> str:
    return "\n".join(f"{k}: {v}" for k, v in prov.items() if not isinstance(v, dict))
