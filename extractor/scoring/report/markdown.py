"""The report's Markdown summary: every value inline text whose markup characters are backslash-escaped and
whose line breaks are spaces (`md_text`), so corpus or model output can never inject markup nor break a table."""
from __future__ import annotations

import re

from extractor.scoring.report.cells import rate, score_rows

# Every ASCII punctuation character that can open Markdown or GFM markup inline: code spans, emphasis, links and
# images, raw HTML and entities, table cells, strikethrough, math. CommonMark lets a backslash escape each.
# A run of underscores between two letters or digits can neither open nor close emphasis, so `jd_requirements`
# stays as written.
_MD_SPECIAL = re.compile(r"[\\`*{}\[\]()<>#!|~&$]|_+")
_LINE_BREAKS = re.compile(r"[\r\n\v\f\x1c-\x1e\x85\u2028\u2029]+")


def _md_escape(m: re.Match) -> str:
    text, i, j = m.string, m.start(), m.end()
    if m.group()[0] == "_" and 0 < i and j < len(text) and text[i - 1].isalnum() and text[j].isalnum():
        return m.group()
    return "".join("\\" + c for c in m.group())


def md_text(value) -> str:
    """A value as inert inline Markdown: one line, every markup character backslash-escaped."""
    return _MD_SPECIAL.sub(_md_escape, _LINE_BREAKS.sub(" ", str(value)))


def summary(result: dict, title: str, has_conf: bool) -> str:
    e = md_text
    lines = [f"# {e(title)}", "", "| class | precision | recall | F1 | support |", "| --- | --- | --- | --- | --- |"]
    for name, m in score_rows(result):
        lines.append(f"| {e(name)} | {m['precision']:.4f} | {m['recall']:.4f} | {m['f1']:.4f} | "
                     f"{e(m.get('support', ''))} |")
    lines += ["", "![F1 per class](f1_per_class.png)", ""]
    if has_conf:
        lines += ["![confusion matrix](confusion.png)", ""]
    lines += ["| status | records |", "| --- | --- |"]
    lines += [f"| {e(s)} | {n} |" for s, n in result["status_counts"].items()]
    lines += ["", f"lenient token-overlap micro F1: {result['lenient']['micro']['f1']:.4f}", ""]
    lines += grounding_markdown(result)
    lines += confusion_markdown(result.get("confusion_fields") or {})
    for cls, ex in result["examples"].items():
        for x in (ex.get("wrong_values") or [])[:3]:
            lines.append(f"- {e(cls)} wrong value: predicted “{e(x['predicted'])}”, expected “{e(x['expected'])}” "
                         f"×{x['count']} (record {e(x['id'])}: {e(x['snippet'])})")
        for kind in ("false_positives", "false_negatives"):
            for x in ex[kind][:3]:
                lines.append(f"- {e(cls)} {kind.replace('_', ' ')[:-1]}: “{e(x['key'])}” ×{x['count']} "
                             f"(record {e(x['id'])}: {e(x['snippet'])})")
    lines += failed_markdown(result.get("failed") or {})
    return "\n".join(lines) + "\n"


def gold_free_summary(result: dict, title: str) -> str:
    """Without gold: the title and the grounded rate."""
    return "\n".join([f"# {md_text(title)}", "", *grounding_markdown(result)]) + "\n"


def grounding_markdown(result: dict) -> list[str]:
    g = result.get("grounding")
    if not g:
        return []
    e = md_text
    lines = ["| field | extracted | grounded | rate | copied from prompt |", "| --- | --- | --- | --- | --- |"]
    for name, m in [*g["fields"].items(), ("micro", g["micro"])]:
        lines.append(f"| {e(name)} | {m['extracted']} | {m['grounded']} | {rate(m['rate'])} | "
                     f"{m['copied_from_prompt']} |")
    for field, values in g["ungrounded"].items():
        for v in values[:3]:
            lines.append(f"- {e(field)} ungrounded: “{e(v['value'])}” ×{v['count']} (record {e(v['id'])})")
    return ["", *lines, ""]

def confusion_markdown(fields: dict) -> list[str]:
    e = md_text
    lines = []
    for name, m in fields.items():
        if "skipped" in m:
            continue
        lines += ["", f"{e(name)}: gold (rows) × predicted (columns)", "",
                  "| gold | " + " | ".join(e(lab) for lab in m["labels"]) + " |",
                  "| --- |" + " --- |" * len(m["labels"])]
        lines += [f"| {e(g)} | " + " | ".join(str(v) for v in row) + " |" for g, row in zip(m["labels"], m["matrix"])]
    return [*lines, ""] if lines else lines


def failed_markdown(failed: dict) -> list[str]:
    e = md_text
    lines = [""] if failed else []
    for status, entry in failed.items():
        first = entry["records"][0] if entry["records"] else None
        example = f" (e.g. record {e(first['id'])}: {e(first['error'] or '')})" if first else ""
        lines.append(f"- {e(status)}: {entry['count']} records scored as empty{example}")
    return lines
