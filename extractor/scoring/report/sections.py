"""The report page's sections, each from one part of the result: statuses, confusion matrices per field,
errors by record, the most frequent errors per class, failed outputs, and the grounded rate."""
from __future__ import annotations

import html

from extractor.scoring.report.cells import rate
from extractor.scoring.report.filters import filter_key
from extractor.scoring.report.marks import highlighted, layered


def status_html(result: dict) -> str:
    e = html.escape
    rows = "".join(f"<tr class='fs' data-status='{filter_key(s)}'><td>{e(s)}</td><td>{n}</td></tr>"
                   for s, n in result["status_counts"].items())
    return f"<h2>Statuses</h2><table id=\"statuses\"><tr><th>status</th><th>records</th></tr>{rows}</table>"


def field_confusion_html(fields: dict) -> str:
    """One gold × predicted table per categorical field; a field with no matrix says why."""
    e = html.escape
    parts = []
    for name, m in fields.items():
        if "skipped" in m:
            parts.append(f"<div class='fc' data-class='{filter_key(name)}'><h3>{e(name)}</h3><p>{e(m['skipped'])}</p></div>")
            continue
        labels, matrix = m["labels"], m["matrix"]
        top = max((v for row in matrix for v in row), default=0) or 1
        head = ("<tr><th>gold \\ predicted</th>" + "".join(f"<th>{e(lab)}</th>" for lab in labels) + "</tr>")
        body = "".join(
            f"<tr><th class='gold'>{e(g)}</th>" + "".join(
                f"<td class='{'hit' if i == j else 'miss'}' style='background:rgba(59,125,216,{v / top * 0.6:.2f})'>"
                f"{v}</td>" for j, v in enumerate(row)) + "</tr>"
            for i, (g, row) in enumerate(zip(labels, matrix)))
        parts.append(f"<div class='fc' data-class='{filter_key(name)}'><h3>{e(name)}</h3><table class='cm'>{head}{body}"
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
    return (f"<li class='fc err-{kind}' data-class='{filter_key(item['class'])}'><b>{e(item['class'])}</b>: {what} "
            f"<span class='kind'>({KIND_TEXT[kind]})</span></li>")


def error_records_html(errors: dict | None) -> str:
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
        blocks.append(f"<div class='rec' data-status='{filter_key(r['status'])}'><b>record {e(r['id'])}</b> "
                      f"<span class='status{' failed' if failed else ''}'>{e(r['status'])}</span>{error}{src}"
                      f"<ul>{''.join(_error_item(i) for i in items)}</ul></div>")
    note = (f"{errors['shown']} of {errors['records_with_errors']} records with errors shown (up to "
            f"{errors['per_class']} per class and per failed status)")
    return (f"<h2>Errors by record</h2><p>{note}; <mark class='pred'>predicted</mark> and "
            f"<mark class='gold'>expected</mark> values marked where found in the text</p>"
            f"<div id='error-records'>{''.join(blocks) or '<p>none</p>'}</div>")


def examples_html(examples: dict) -> str:
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
            parts.append(f"<div class='fc' data-class='{filter_key(cls)}'>{''.join(lists)}</div>")
    return "".join(parts) or "<p>none</p>"


def failed_html(failed: dict) -> str:
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
        parts.append(f"<div class='fs' data-status='{filter_key(status)}'><h3>{e(status)}: {entry['count']} records{more}"
                     f"</h3><ul>{''.join(rows)}</ul></div>")
    return ("<h2>Failed outputs</h2><p>records scored as empty: their raw output and the parser's error</p>"
            f"<div id='failed'>{''.join(parts)}</div>")


def grounding_html(result: dict) -> str:
    g = result.get("grounding")
    if not g:
        return ""
    e = html.escape
    cols = ("extracted", "grounded", "rate", "exact", "normalized", "fuzzy", "copied_from_prompt")
    head = "<tr><th>field</th>" + "".join(f"<th>{c.replace('_', ' ')}</th>" for c in cols) + "</tr>"
    rows = [*g["fields"].items(), ("micro", g["micro"])]
    body = "".join(("<tr class='avg'>" if name == "micro" else f"<tr class='cls fc' data-class='{filter_key(name)}'>")
                   + f"<td>{e(name)}</td>"
                   + "".join(f"<td>{rate(m[c]) if c == 'rate' else m[c]}</td>" for c in cols) + "</tr>"
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
        lists.append(f"<div class='fc' data-class='{filter_key(field)}'><h3>{e(field)}: ungrounded values</h3>"
                     f"<ul>{items}</ul></div>")
    parts.append("<div id='ungrounded'>" + ("".join(lists) or "<p>every value was found in its text</p>") + "</div>")
    return "".join(parts)
