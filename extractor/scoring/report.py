"""Self-contained HTML report and Markdown summary of a metrics result.

Charts are drawn once with matplotlib (Agg) and written twice: as inline SVG in the HTML, with every label
a <text> element the viewing browser draws with its own fonts (class names in any script are legible even
when the machine that wrote the report has no font for them), and as PNG files beside the Markdown
(rasterised here: Chinese labels need a CJK font on this machine, used when one is installed).
All record text goes through html.escape, and matplotlib escapes the SVG's text (with mathtext off, so a
label holding `$` is text, not a formula to parse); in the Markdown every value is inline text whose markup
characters are backslash-escaped and whose line breaks are spaces (`md_text`): corpus or model output can
never inject markup or script, nor break a table, in either.

Each false positive and false negative is shown in its record's text, the value's span (where grounding
found it) in a <mark>: the text is cut at the span's offsets first and each piece escaped on its own, so a
span can never split an entity or a tag. The grounded rate per field and the ungrounded values follow; a
result without gold (the grounded rate only) gets those sections alone.
"""
from __future__ import annotations

import html
import io
import re
import warnings
from pathlib import Path

REPORT_FILES = ("report.html", "summary.md", "f1_per_class.png", "confusion.png")
CJK_FONTS = ("WenQuanYi Zen Hei", "Noto Sans CJK SC", "Noto Sans SC", "Source Han Sans SC", "SimHei")
# The browser's font stack for chart labels: common CJK fonts on each OS, then the generic family.
BROWSER_FONTS = ("system-ui, -apple-system, 'Segoe UI', 'Noto Sans', 'Noto Sans CJK SC', 'PingFang SC', "
                 "'Microsoft YaHei', 'WenQuanYi Zen Hei', 'Source Han Sans SC', sans-serif")


def _pyplot():
    import logging

    import matplotlib
    matplotlib.use("Agg")
    logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)
    import matplotlib.pyplot as plt
    from matplotlib import font_manager
    names = {f.name for f in font_manager.fontManager.ttflist}
    # PNG only: put a CJK font in the fallback chain when one is installed.
    plt.rcParams["font.sans-serif"] = [n for n in CJK_FONTS if n in names] + ["DejaVu Sans"]
    plt.rcParams["font.family"] = "sans-serif"
    plt.rcParams["text.parse_math"] = False  # class names are data: '$x^$' is a label, not a broken formula
    plt.rcParams["svg.fonttype"] = "none"  # SVG text stays text: the browser draws the glyphs
    plt.rcParams["svg.hashsalt"] = "extractor-report"  # stable element ids: the same result, the same file
    return plt


class Chart:
    """One figure as PNG bytes and as an SVG element ready to inline (no XML prolog, an id, a label)."""

    def __init__(self, fig, element_id: str, label: str):
        with warnings.catch_warnings():  # glyphs missing from the PNG's fonts: the SVG does not need them
            warnings.filterwarnings("ignore", message="Glyph .* missing from")
            self.png = self._save(fig, "png", dpi=110)
            svg = self._save(fig, "svg", metadata={"Date": None}).decode("utf-8")
        svg = svg[svg.index("<svg"):]
        self.svg = svg.replace("<svg ", f'<svg id="{element_id}" role="img" aria-label="{html.escape(label)}" ', 1)

    @staticmethod
    def _save(fig, fmt: str, **kwargs) -> bytes:
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, bbox_inches="tight", **kwargs)
        return buf.getvalue()


def f1_chart(result: dict) -> Chart:
    plt = _pyplot()
    classes = list(result["classes"])
    f1s = [result["classes"][c]["f1"] for c in classes]
    fig, ax = plt.subplots(figsize=(7, max(2.0, 0.32 * len(classes) + 1)))
    ax.barh(classes[::-1], f1s[::-1], color="#3b7dd8")
    ax.set_xlim(0, 1)
    ax.set_xlabel("F1")
    ax.axvline(result["micro"]["f1"], color="#d8553b", linestyle="--", label=f"micro F1 {result['micro']['f1']:.3f}")
    ax.legend(loc="lower right")
    ax.set_title("F1 per class")
    chart = Chart(fig, "f1-chart", "F1 per class")
    plt.close(fig)
    return chart


def confusion_chart(result: dict) -> Chart | None:
    cells = result.get("confusion")
    if not cells:
        return None
    plt = _pyplot()
    labels = sorted({c["gold"] for c in cells} | {c["pred"] for c in cells})
    index = {lab: i for i, lab in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    for c in cells:
        matrix[index[c["gold"]]][index[c["pred"]]] = c["count"]
    fig, ax = plt.subplots(figsize=(1 + 0.6 * len(labels), 1 + 0.55 * len(labels)))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            if v:
                ax.text(j, i, str(v), ha="center", va="center", fontsize=8)
    ax.set_title("Confusion matrix")
    chart = Chart(fig, "confusion", "confusion matrix")
    plt.close(fig)
    return chart


def _rows(result: dict) -> list[tuple[str, dict]]:
    rows = list(result["classes"].items())
    rows.append(("micro", result["micro"]))
    rows.append(("macro", result["macro"]))
    rows.append(("weighted", result["weighted"]))
    return rows


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def write_report(result: dict, out_dir: Path, title: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    if "classes" not in result:  # no gold: the grounded rate only
        html_path, md_path = out_dir / "report.html", out_dir / "summary.md"
        html_path.write_text(_gold_free_html(result, title), encoding="utf-8")
        md_path.write_text("\n".join([f"# {md_text(title)}", "", *_grounding_markdown(result)]) + "\n",
                           encoding="utf-8")
        return html_path, md_path
    f1 = f1_chart(result)
    conf = confusion_chart(result)
    (out_dir / "f1_per_class.png").write_bytes(f1.png)
    if conf:
        (out_dir / "confusion.png").write_bytes(conf.png)
    html_path = out_dir / "report.html"
    html_path.write_text(_html(result, title, f1, conf), encoding="utf-8")
    md_path = out_dir / "summary.md"
    md_path.write_text(_markdown(result, title, conf is not None), encoding="utf-8")
    return html_path, md_path


def _html(result: dict, title: str, f1: Chart, conf: Chart | None) -> str:
    e = html.escape
    head = "<tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th><th>TP</th><th>FP</th><th>FN</th></tr>"
    body = "".join(
        f"<tr class='{'avg' if name in ('micro', 'macro', 'weighted') else 'cls'}'><td>{e(name)}</td>"
        + "".join(f"<td>{_fmt(m.get(k, ''))}</td>" for k in ("precision", "recall", "f1", "support", "tp", "fp", "fn"))
        + "</tr>" for name, m in _rows(result))
    statuses = "".join(f"<tr><td>{e(s)}</td><td>{n}</td></tr>" for s, n in result["status_counts"].items())
    lenient = result["lenient"]["micro"]
    examples = []
    for cls, ex in result["examples"].items():
        for kind, label in (("false_positives", "false positives"), ("false_negatives", "false negatives")):
            items = "".join(f"<li><code>{e(x['key'])}</code> ×{x['count']} — record <b>{e(x['id'])}</b>: "
                            f"<span class='snippet'>{highlighted(x)}</span></li>" for x in ex[kind])
            if items:
                examples.append(f"<h3>{e(cls)}: top {label}</h3><ul>{items}</ul>")
    rec = result["records"]
    prov = result.get("provenance", {})
    conf_html = f"<h2>Confusion matrix</h2><div class='chart'>{conf.svg}</div>" if conf else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}td:first-child{{text-align:left}}
tr.avg{{font-weight:bold;background:#f3f3f3}}.snippet{{color:#555}}{MARK_CSS}
.chart svg{{max-width:100%;height:auto;overflow:visible}}.chart{{padding-left:3em}}
.chart svg text{{font-family:{BROWSER_FONTS} !important}}</style></head>
<body><h1>{e(title)}</h1>
<p>task <b>{e(str(prov.get('task', '')))}</b> v{e(str(prov.get('task_version', '')))} ·
records scored {rec['scored']} · missing predictions {rec['missing']} · predictions not in gold {rec['extra_predictions']}
· malformed predictions {rec.get('malformed', 0)} · malformed gold {rec.get('malformed_gold', 0)}
· micro F1 <b id="micro-f1">{result['micro']['f1']:.4f}</b> · lenient (token overlap) micro F1 {lenient['f1']:.4f}</p>
<h2>Per class</h2><table id="per-class"><thead>{head}</thead><tbody>{body}</tbody></table>
<h2>F1 per class</h2><div class="chart">{f1.svg}</div>
{conf_html}
<h2>Statuses</h2><table id="statuses"><tr><th>status</th><th>records</th></tr>{statuses}</table>
<h2>Errors by class</h2>{''.join(examples) or '<p>none</p>'}
{_grounding_html(result)}
<h2>Provenance</h2><pre>{e(_prov_text(prov))}</pre>
</body></html>
"""


MARK_CSS = ("mark{background:#ffe08a;color:#000}mark.normalized{background:#c9e7ff}mark.fuzzy{background:#f3c9ff}"
            ".copied{color:#b00}")


def highlighted(example: dict) -> str:
    """An example's text window as HTML, each highlight in a <mark>: cut at the offsets, then each piece
    escaped on its own (escaping first would move the offsets and could split an entity)."""
    text = str(example.get("snippet", ""))
    out, at = [], 0
    for h in sorted(example.get("highlights") or [], key=lambda h: h["start"]):
        start, end = max(at, int(h["start"])), min(len(text), int(h["end"]))
        if end <= start:
            continue
        match = h.get("match") if h.get("match") in ("exact", "normalized", "fuzzy") else "exact"
        out.append(html.escape(text[at:start]))
        out.append(f"<mark class='{match}' title='{match} match'>{html.escape(text[start:end])}</mark>")
        at = end
    out.append(html.escape(text[at:]))
    return "".join(out)


def _rate(v) -> str:
    return "—" if v is None else f"{v:.4f}"


def _grounding_html(result: dict) -> str:
    g = result.get("grounding")
    if not g:
        return ""
    e = html.escape
    cols = ("extracted", "grounded", "rate", "exact", "normalized", "fuzzy", "copied_from_prompt")
    head = "<tr><th>field</th>" + "".join(f"<th>{c.replace('_', ' ')}</th>" for c in cols) + "</tr>"
    rows = [*g["fields"].items(), ("micro", g["micro"])]
    body = "".join(f"<tr class='{'avg' if name == 'micro' else 'cls'}'><td>{e(name)}</td>"
                   + "".join(f"<td>{_rate(m[c]) if c == 'rate' else m[c]}</td>" for c in cols) + "</tr>"
                   for name, m in rows)
    parts = [f"<h2>Grounded rate</h2><p>values found in their record's text / values extracted; "
             f"records grounded {g['records']['grounded']}, with values but no text {g['records']['without_text']}"
             f"</p><table id='grounding'><thead>{head}</thead><tbody>{body}</tbody></table>"]
    if g.get("by_outcome"):
        keys = ("tp_grounded", "tp_ungrounded", "fp_grounded", "fp_ungrounded")
        split = [*g["by_outcome"]["classes"].items(), ("micro", g["by_outcome"]["micro"])]
        parts.append("<h3>Grounded and ungrounded predictions by outcome</h3><table id='by-outcome'><tr>"
                     "<th>class</th>" + "".join(f"<th>{k.replace('_', ' ')}</th>" for k in keys) + "</tr>"
                     + "".join(f"<tr><td>{e(c)}</td>" + "".join(f"<td>{m[k]}</td>" for k in keys) + "</tr>"
                               for c, m in split) + "</table>")
    lists = []
    for field, values in g["ungrounded"].items():
        items = "".join(f"<li><code>{e(v['value'])}</code> ×{v['count']} — record <b>{e(v['id'])}</b>"
                        + (" <span class='copied'>copied from the prompt</span>" if v["copied_from_prompt"] else "")
                        + "</li>" for v in values)
        lists.append(f"<h3>{e(field)}: ungrounded values</h3><ul>{items}</ul>")
    parts.append("<div id='ungrounded'>" + ("".join(lists) or "<p>every value was found in its text</p>") + "</div>")
    return "".join(parts)


def _gold_free_html(result: dict, title: str) -> str:
    e = html.escape
    prov = result.get("provenance", {})
    statuses = "".join(f"<tr><td>{e(s)}</td><td>{n}</td></tr>" for s, n in result["status_counts"].items())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}td:first-child{{text-align:left}}
tr.avg{{font-weight:bold;background:#f3f3f3}}{MARK_CSS}</style></head>
<body><h1>{e(title)}</h1>
<p>task <b>{e(str(prov.get('task', '')))}</b> v{e(str(prov.get('task_version', '')))} · no gold ·
predictions {result['records']['predictions']} · grounded rate
<b id="grounded-rate">{_rate(result['grounding']['micro']['rate'])}</b></p>
{_grounding_html(result)}
<h2>Statuses</h2><table id="statuses"><tr><th>status</th><th>records</th></tr>{statuses}</table>
<h2>Provenance</h2><pre>{e(_prov_text(prov))}</pre>
</body></html>
"""


def _grounding_markdown(result: dict) -> list[str]:
    g = result.get("grounding")
    if not g:
        return []
    e = md_text
    lines = ["| field | extracted | grounded | rate | copied from prompt |", "| --- | --- | --- | --- | --- |"]
    for name, m in [*g["fields"].items(), ("micro", g["micro"])]:
        lines.append(f"| {e(name)} | {m['extracted']} | {m['grounded']} | {_rate(m['rate'])} | "
                     f"{m['copied_from_prompt']} |")
    for field, values in g["ungrounded"].items():
        for v in values[:3]:
            lines.append(f"- {e(field)} ungrounded: “{e(v['value'])}” ×{v['count']} (record {e(v['id'])})")
    return ["", *lines, ""]


def _prov_text(prov: dict) -> str:
    return "\n".join(f"{k}: {v}" for k, v in prov.items() if not isinstance(v, dict))


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


def _markdown(result: dict, title: str, has_conf: bool) -> str:
    e = md_text
    lines = [f"# {e(title)}", "", "| class | precision | recall | F1 | support |", "| --- | --- | --- | --- | --- |"]
    for name, m in _rows(result):
        lines.append(f"| {e(name)} | {m['precision']:.4f} | {m['recall']:.4f} | {m['f1']:.4f} | "
                     f"{e(m.get('support', ''))} |")
    lines += ["", "![F1 per class](f1_per_class.png)", ""]
    if has_conf:
        lines += ["![confusion matrix](confusion.png)", ""]
    lines += ["| status | records |", "| --- | --- |"]
    lines += [f"| {e(s)} | {n} |" for s, n in result["status_counts"].items()]
    lines += ["", f"lenient token-overlap micro F1: {result['lenient']['micro']['f1']:.4f}", ""]
    lines += _grounding_markdown(result)
    for cls, ex in result["examples"].items():
        for kind in ("false_positives", "false_negatives"):
            for x in ex[kind][:3]:
                lines.append(f"- {e(cls)} {kind.replace('_', ' ')[:-1]}: “{e(x['key'])}” ×{x['count']} "
                             f"(record {e(x['id'])}: {e(x['snippet'])})")
    return "\n".join(lines) + "\n"
