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
"""
from __future__ import annotations

import base64
import hashlib
import html
import io
import json
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
    fig = f1_figure(plt, result)
    chart = Chart(fig, "f1-chart", "F1 per class")
    plt.close(fig)
    return chart


def f1_figure(plt, result: dict):
    """Bars of F1 per class and the micro F1 line; the legend sits below the axes, where it cannot cover a
    bar whatever the scores."""
    classes = list(result["classes"])
    f1s = [result["classes"][c]["f1"] for c in classes]
    fig, ax = plt.subplots(figsize=(7, max(2.0, 0.32 * len(classes) + 1.3)), layout="constrained")
    ax.barh(classes[::-1], f1s[::-1], color="#3b7dd8")
    ax.set_xlim(0, 1)
    ax.set_xlabel("F1")
    ax.axvline(result["micro"]["f1"], color="#d8553b", linestyle="--", label=f"micro F1 {result['micro']['f1']:.3f}")
    fig.legend(loc="outside lower center", frameon=False)
    ax.set_title("F1 per class")
    return fig


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
        (f"<tr class='avg'>" if name in ('micro', 'macro', 'weighted') else f"<tr class='cls fc' data-class='{_key(name)}'>")
        + f"<td>{e(name)}</td>"
        + "".join(f"<td>{_fmt(m.get(k, ''))}</td>" for k in ("precision", "recall", "f1", "support", "tp", "fp", "fn"))
        + "</tr>" for name, m in _rows(result))
    lenient = result["lenient"]["micro"]
    rec = result["records"]
    prov = result.get("provenance", {})
    conf_html = f"<h2>Confusion matrix</h2><div class='chart'>{conf.svg}</div>" if conf else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">{_csp()}<title>{e(title)}</title>
<style>{PAGE_CSS}{MARK_CSS}
.chart svg{{max-width:100%;height:auto;overflow:visible}}.chart{{padding-left:3em}}
.chart svg text{{font-family:{BROWSER_FONTS} !important}}</style></head>
<body><h1>{e(title)}</h1>
<p>task <b>{e(str(prov.get('task', '')))}</b> v{e(str(prov.get('task_version', '')))} ·
records scored {rec['scored']} · missing predictions {rec['missing']} · predictions not in gold {rec['extra_predictions']}
· malformed predictions {rec.get('malformed', 0)} · malformed gold {rec.get('malformed_gold', 0)}
· micro F1 <b id="micro-f1">{result['micro']['f1']:.4f}</b> · lenient (token overlap) micro F1 {lenient['f1']:.4f}</p>
{_filters(list(result["classes"]), _statuses(result))}
<h2>Per class</h2><table id="per-class"><thead>{head}</thead><tbody>{body}</tbody></table>
<h2>F1 per class</h2><div class="chart">{f1.svg}</div>
{conf_html}{_field_confusion_html(result.get("confusion_fields") or {})}
{_status_html(result)}
{_error_records_html(result.get("errors"))}
<h2>Most frequent errors by class</h2>{_examples_html(result["examples"])}
{_failed_html(result.get("failed") or {})}
{_grounding_html(result)}
<h2>Provenance</h2><pre>{e(_prov_text(prov))}</pre>
{_script()}</body></html>
"""


PAGE_CSS = ("body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child{text-align:left}"
            "tr.avg{font-weight:bold;background:#f3f3f3}.snippet{color:#555}"
            "#filters{position:sticky;top:0;background:#fff;padding:.5em 0;border-bottom:1px solid #ccc;z-index:1}"
            "#filters label{margin-right:1.5em}.rec{border:1px solid #ddd;border-radius:4px;padding:.4em .8em;"
            "margin:.5em 0}.rec .src{white-space:pre-wrap;color:#333;background:#fafafa;padding:.3em}"
            ".rec ul{margin:.3em 0}.status{font-size:90%;padding:0 .4em;border-radius:3px;background:#eee}"
            ".status.failed{background:#f8d0d0}.kind{font-size:85%;color:#666}"
            "mark.pred{background:#ffd0a8;color:#000}mark.gold{background:#c8f0c8;color:#000}"
            "mark.pred.gold{background:linear-gradient(#ffd0a8 50%,#c8f0c8 50%)}"
            "table.cm td.hit{font-weight:bold}table.cm th.gold{text-align:left}"
            "pre.raw{white-space:pre-wrap;word-break:break-all;background:#f6f6f6;padding:.4em;max-height:20em;"
            "overflow:auto}[hidden]{display:none !important}mark.off{background:none !important}")


# Filtering: elements of class `fc` carry data-class, those of class `fs` data-status (each a `_key`, the options'
# values); a record (`rec`) shows when its status passes and any of its errors' classes does, its marks of other
# classes unmarked. The address's #class=NAME&status=NAME picks options by their text. Plain DOM calls, run
# once the page is parsed.
FILTER_JS = """(function () {
  var cls = document.getElementById('f-class'), st = document.getElementById('f-status');
  var count = document.getElementById('f-shown');
  function pick(select, name) {
    for (var i = 1; i < select.options.length; i++) {
      if (select.options[i].text === name) { select.selectedIndex = i; return; }
    }
  }
  function chosen(select) {
    return select.selectedIndex > 0 ? select.options[select.selectedIndex].text : '';
  }
  function apply() {
    var c = cls.value, s = st.value, shown = 0;
    document.querySelectorAll('.fc').forEach(function (el) {
      el.hidden = c !== '' && el.getAttribute('data-class') !== c;
    });
    document.querySelectorAll('.fs').forEach(function (el) {
      el.hidden = s !== '' && el.getAttribute('data-status') !== s;
    });
    document.querySelectorAll('mark[data-classes]').forEach(function (m) {
      m.classList.toggle('off', c !== '' && m.getAttribute('data-classes').split(' ').indexOf(c) < 0);
    });
    document.querySelectorAll('.rec').forEach(function (el) {
      var items = el.querySelectorAll('li.fc'), any = c === '' && items.length === 0;
      items.forEach(function (li) { any = any || !li.hidden; });
      el.hidden = !any || (s !== '' && el.getAttribute('data-status') !== s);
      shown += el.hidden ? 0 : 1;
    });
    if (count) count.textContent = String(shown);
    var hash = new URLSearchParams();
    if (c !== '') hash.set('class', chosen(cls));
    if (s !== '') hash.set('status', chosen(st));
    history.replaceState(null, '', hash.toString() ? '#' + hash.toString() : location.pathname);
  }
  var wanted = new URLSearchParams(location.hash.slice(1));
  if (wanted.has('class')) pick(cls, wanted.get('class'));
  if (wanted.has('status')) pick(st, wanted.get('status'));
  cls.addEventListener('change', apply);
  st.addEventListener('change', apply);
  apply();
})();"""


def _csp() -> str:
    """No network, no plugin, no script but FILTER_JS (by its hash); inline styles for the charts."""
    digest = base64.b64encode(hashlib.sha256(FILTER_JS.encode("utf-8")).digest()).decode("ascii")
    return ("<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
            f"style-src 'unsafe-inline'; img-src data:; script-src 'sha256-{digest}'\">")


def _script() -> str:
    return f"<script>{FILTER_JS}</script>"


def _filters(classes: list[str], statuses: list[str], records: bool = True) -> str:
    """The class and status selects (a class is a field where there is no gold); records: whether to count the
    error records shown."""
    e = html.escape
    opts = lambda names: "".join(f"<option value='{_key(n)}'>{e(n)}</option>" for n in names)  # noqa: E731
    shown = "<span>records shown: <b id='f-shown'>–</b></span>" if records else ""
    return (f"<form id='filters'><label>class <select id='f-class'><option value=''>all"
            f"</option>{opts(classes)}</select></label><label>status <select id='f-status'><option value=''>"
            f"all</option>{opts(statuses)}</select></label>{shown}</form>")


def _key(name) -> str:
    """A class or status as the filters know it: a digest, so no value of the data sits in an attribute."""
    return "k" + hashlib.sha256(str(name).encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _statuses(result: dict) -> list[str]:
    return list(result.get("status_counts") or {})


def _status_html(result: dict) -> str:
    e = html.escape
    rows = "".join(f"<tr class='fs' data-status='{_key(s)}'><td>{e(s)}</td><td>{n}</td></tr>"
                   for s, n in result["status_counts"].items())
    return f"<h2>Statuses</h2><table id=\"statuses\"><tr><th>status</th><th>records</th></tr>{rows}</table>"


def _field_confusion_html(fields: dict) -> str:
    """One gold × predicted table per categorical field; a field with no matrix says why."""
    e = html.escape
    parts = []
    for name, m in fields.items():
        if "skipped" in m:
            parts.append(f"<div class='fc' data-class='{_key(name)}'><h3>{e(name)}</h3><p>{e(m['skipped'])}</p></div>")
            continue
        labels, matrix = m["labels"], m["matrix"]
        top = max((v for row in matrix for v in row), default=0) or 1
        head = ("<tr><th>gold \\ predicted</th>" + "".join(f"<th>{e(lab)}</th>" for lab in labels) + "</tr>")
        body = "".join(
            f"<tr><th class='gold'>{e(g)}</th>" + "".join(
                f"<td class='{'hit' if i == j else 'miss'}' style='background:rgba(59,125,216,{v / top * 0.6:.2f})'>"
                f"{v}</td>" for j, v in enumerate(row)) + "</tr>"
            for i, (g, row) in enumerate(zip(labels, matrix)))
        parts.append(f"<div class='fc' data-class='{_key(name)}'><h3>{e(name)}</h3><table class='cm'>{head}{body}"
                     f"</table><p>{m['correct']} of {m['records']} records on the diagonal</p></div>")
    if not parts:
        return ""
    return ("<h2>Confusion matrices</h2><p>enum and boolean fields: gold (rows) × predicted (columns), one value "
            "or (none) per record</p><div id='confusion-fields'>" + "".join(parts) + "</div>")


KIND_TEXT = {"wrong": "wrong value", "fp": "false positive", "fn": "false negative"}


def _error_item(item: dict) -> str:
    e = html.escape
    kind = item["kind"]
    if kind == "wrong":
        what = (f"predicted <code class='pred'>{e(item['predicted'])}</code>, expected "
                f"<code class='gold'>{e(item['expected'])}</code>")
    elif kind == "fp":
        what = f"predicted <code class='pred'>{e(item['predicted'])}</code>, expected nothing"
    else:
        what = f"predicted nothing, expected <code class='gold'>{e(item['expected'])}</code>"
    return (f"<li class='fc err-{kind}' data-class='{_key(item['class'])}'><b>{e(item['class'])}</b>: {what} "
            f"<span class='kind'>({KIND_TEXT[kind]})</span></li>")


def _error_records_html(errors: dict | None) -> str:
    """Each kept record: its id and status, its text with the predicted and expected values marked, and its
    errors, wrong values first as predicted/expected pairs."""
    if not errors:
        return ""
    e = html.escape
    blocks = []
    for r in errors["records"]:
        failed = r["status"] != "ok"
        items = sorted(r["errors"], key=lambda i: ("wrong", "fp", "fn").index(i["kind"]))
        src = (f"<div class='src'>{layered(r)}</div>" if r["has_text"]
               else "<p class='kind'>no text for this record (pass --corpus, or keep the text in the rows)</p>")
        error = f"<p>error: <code>{e(r['error'])}</code></p>" if r.get("error") else ""
        blocks.append(f"<div class='rec' data-status='{_key(r['status'])}'><b>record {e(r['id'])}</b> "
                      f"<span class='status{' failed' if failed else ''}'>{e(r['status'])}</span>{error}{src}"
                      f"<ul>{''.join(_error_item(i) for i in items)}</ul></div>")
    note = (f"{errors['shown']} of {errors['records_with_errors']} records with errors shown (up to "
            f"{errors['per_class']} per class and per failed status)")
    return (f"<h2>Errors by record</h2><p>{note}; <mark class='pred'>predicted</mark> and "
            f"<mark class='gold'>expected</mark> values marked where found in the text</p>"
            f"<div id='error-records'>{''.join(blocks) or '<p>none</p>'}</div>")


def _examples_html(examples: dict) -> str:
    e = html.escape
    parts = []
    for cls, ex in examples.items():
        lists = []
        pairs = "".join(f"<li>predicted <code>{e(x['predicted'])}</code>, expected <code>{e(x['expected'])}</code>"
                        f" ×{x['count']} — record <b>{e(x['id'])}</b>: <span class='snippet'>{highlighted(x)}</span>"
                        "</li>" for x in ex.get("wrong_values") or [])
        if pairs:
            lists.append(f"<h3>{e(cls)}: top wrong values</h3><ul>{pairs}</ul>")
        for kind, label in (("false_positives", "false positives"), ("false_negatives", "false negatives")):
            items = "".join(f"<li><code>{e(x['key'])}</code> ×{x['count']} — record <b>{e(x['id'])}</b>: "
                            f"<span class='snippet'>{highlighted(x)}</span></li>" for x in ex[kind])
            if items:
                lists.append(f"<h3>{e(cls)}: top {label}</h3><ul>{items}</ul>")
        if lists:
            parts.append(f"<div class='fc' data-class='{_key(cls)}'>{''.join(lists)}</div>")
    return "".join(parts) or "<p>none</p>"


def _failed_html(failed: dict) -> str:
    """Records whose output could not be scored, per status, with the raw output as text."""
    if not failed:
        return ""
    e = html.escape
    parts = []
    for status, entry in failed.items():
        rows = []
        for r in entry["records"]:
            cut = f" (first {len(r['raw'])} of {r['raw_chars']} characters)" if r["raw_chars"] > len(r["raw"]) else ""
            error = f" — <code>{e(r['error'])}</code>" if r.get("error") else ""
            rows.append(f"<li>record <b>{e(r['id'])}</b>{error}<pre class='raw'>{e(r['raw']) or '(no output)'}"
                        f"</pre>{cut}</li>")
        more = f"; the first {len(entry['records'])} listed" if entry["count"] > len(entry["records"]) else ""
        parts.append(f"<div class='fs' data-status='{_key(status)}'><h3>{e(status)}: {entry['count']} records{more}"
                     f"</h3><ul>{''.join(rows)}</ul></div>")
    return ("<h2>Failed outputs</h2><p>records scored as empty: their raw output and the parser's error</p>"
            f"<div id='failed'>{''.join(parts)}</div>")


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
        keys = " ".join(sorted({_key(errors[h["item"]]["class"]) for h in over
                                if isinstance(h.get("item"), int) and 0 <= h["item"] < len(errors)}))
        out.append(f"<mark class='{' '.join(roles)}' title='{title}' data-classes='{keys}'>{piece}</mark>")
    return "".join(out)


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
    body = "".join(("<tr class='avg'>" if name == "micro" else f"<tr class='cls fc' data-class='{_key(name)}'>")
                   + f"<td>{e(name)}</td>"
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
        lists.append(f"<div class='fc' data-class='{_key(field)}'><h3>{e(field)}: ungrounded values</h3>"
                     f"<ul>{items}</ul></div>")
    parts.append("<div id='ungrounded'>" + ("".join(lists) or "<p>every value was found in its text</p>") + "</div>")
    return "".join(parts)


def _gold_free_html(result: dict, title: str) -> str:
    e = html.escape
    prov = result.get("provenance", {})
    fields = list(result["grounding"]["fields"])
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">{_csp()}<title>{e(title)}</title>
<style>{PAGE_CSS}{MARK_CSS}</style></head>
<body><h1>{e(title)}</h1>
<p>task <b>{e(str(prov.get('task', '')))}</b> v{e(str(prov.get('task_version', '')))} · no gold ·
predictions {result['records']['predictions']} · grounded rate
<b id="grounded-rate">{_rate(result['grounding']['micro']['rate'])}</b></p>
{_filters(fields, _statuses(result), records=False)}
{_grounding_html(result)}
{_status_html(result)}
{_failed_html(result.get("failed") or {})}
<h2>Provenance</h2><pre>{e(_prov_text(prov))}</pre>
{_script()}</body></html>
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
    lines += _confusion_markdown(result.get("confusion_fields") or {})
    for cls, ex in result["examples"].items():
        for x in (ex.get("wrong_values") or [])[:3]:
            lines.append(f"- {e(cls)} wrong value: predicted “{e(x['predicted'])}”, expected “{e(x['expected'])}” "
                         f"×{x['count']} (record {e(x['id'])}: {e(x['snippet'])})")
        for kind in ("false_positives", "false_negatives"):
            for x in ex[kind][:3]:
                lines.append(f"- {e(cls)} {kind.replace('_', ' ')[:-1]}: “{e(x['key'])}” ×{x['count']} "
                             f"(record {e(x['id'])}: {e(x['snippet'])})")
    lines += _failed_markdown(result.get("failed") or {})
    return "\n".join(lines) + "\n"


def _confusion_markdown(fields: dict) -> list[str]:
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


def _failed_markdown(failed: dict) -> list[str]:
    e = md_text
    lines = [""] if failed else []
    for status, entry in failed.items():
        first = entry["records"][0] if entry["records"] else None
        example = f" (e.g. record {e(first['id'])}: {e(first['error'] or '')})" if first else ""
        lines.append(f"- {e(status)}: {entry['count']} records scored as empty{example}")
    return lines
