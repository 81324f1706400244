"""Self-contained HTML report and Markdown summary of a metrics result.

Charts are drawn once with matplotlib (Agg) and written twice: as inline SVG in the HTML, with every label
a <text> element the viewing browser draws with its own fonts (class names in any script are legible even
when the machine that wrote the report has no font for them), and as PNG files beside the Markdown
(rasterised here: Chinese labels need a CJK font on this machine, used when one is installed).
All record text goes through html.escape, and matplotlib escapes the SVG's text (with mathtext off, so a
label holding `$` is text, not a formula to parse); in the Markdown every value is inline text whose markup
characters are backslash-escaped and whose line breaks are spaces (`md_text`): corpus or model output can
never inject markup or script, nor break a table, in either.

Errors are shown per record: each wrong value as "predicted X, expected Y" (`analysis.py` pairs them), the
other false positives and negatives on their own, in the record's text with every value's span (where
grounding found it) in a <mark>: the text is cut at the spans' offsets first and each piece escaped on its
own, so a span can never split an entity or a tag. The most frequent errors per class, a confusion matrix
per enum or boolean field, the records whose output failed (per status, raw output escaped in a <pre>), the
grounded rate per field and the ungrounded values follow; a result without gold (the grounded rate only)
gets the grounding and failed-output sections alone.

Filtering by class and status is one inline script (`FILTER_JS`, no network, the page stays one file); the
page's Content-Security-Policy allows that script by its hash and nothing else, so even a value that slipped
past escaping could not run. `#class=NAME&status=NAME` in the address opens the page filtered.

Where each part lives: `charts` (the figures), `pages` (the two HTML pages) built from `sections`, `marks`
(values marked in a text), `filters` (selects, script, CSP), `style` (CSS) and `cells` (numbers as text);
`markdown` (the summary).
"""
from __future__ import annotations

from pathlib import Path

from extractor.scoring.report.charts import confusion_chart, f1_chart
from extractor.scoring.report.markdown import gold_free_summary, summary
from extractor.scoring.report.pages import full_page, gold_free_page

REPORT_FILES = ("report.html", "summary.md", "f1_per_class.png", "confusion.png")


def write_report(result: dict, out_dir: Path, title: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    if "classes" not in result:  # no gold: the grounded rate only
        html_path, md_path = out_dir / "report.html", out_dir / "summary.md"
        html_path.write_text(gold_free_page(result, title), encoding="utf-8")
        md_path.write_text(gold_free_summary(result, title), encoding="utf-8")
        return html_path, md_path
    f1 = f1_chart(result)
    conf = confusion_chart(result)
    (out_dir / "f1_per_class.png").write_bytes(f1.png)
    if conf:
        (out_dir / "confusion.png").write_bytes(conf.png)
    html_path = out_dir / "report.html"
    html_path.write_text(full_page(result, title, f1, conf), encoding="utf-8")
    md_path = out_dir / "summary.md"
    md_path.write_text(summary(result, title, conf is not None), encoding="utf-8")
    return html_path, md_path
