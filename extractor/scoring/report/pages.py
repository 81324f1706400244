"""The two report pages, each one self-contained HTML file: with gold (scores, charts, errors) and without
(the grounded rate and the failed outputs)."""
from __future__ import annotations

import html

from extractor.scoring.report.cells import number, prov_text, rate, score_rows
from extractor.scoring.report.charts import Chart
from extractor.scoring.report.filters import csp_meta, filter_form, filter_key, filter_script, statuses_of
from extractor.scoring.report.sections import (error_records_html, examples_html, failed_html, field_confusion_html,
                                               grounding_html, status_html)
from extractor.scoring.report.style import BROWSER_FONTS, MARK_CSS, PAGE_CSS


def full_page(result: dict, title: str, f1: Chart, conf: Chart | None) -> str:
    e = html.escape
    head = "<tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th><th>TP</th><th>FP</th><th>FN</th></tr>"
    body = "".join(
        ("<tr class='avg'>" if name in ('micro', 'macro', 'weighted') else f"<tr class='cls fc' data-class='{filter_key(name)}'>")
        + f"<td>{e(name)}</td>"
        + "".join(f"<td>{number(m.get(k, ''))}</td>" for k in ("precision", "recall", "f1", "support", "tp", "fp", "fn"))
        + "</tr>" for name, m in score_rows(result))
    lenient = result["lenient"]["micro"]
    rec = result["records"]
    prov = result.get("provenance", {})
    conf_html = f"<h2>Confusion matrix</h2><div class='chart'>{conf.svg}</div>" if conf else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">{csp_meta()}<title>{e(title)}</title>
<style>{PAGE_CSS}{MARK_CSS}
.chart svg{{max-width:100%;height:auto;overflow:visible}}.chart{{padding-left:3em}}
.chart svg text{{font-family:{BROWSER_FONTS} !important}}</style></head>
<body><h1>{e(title)}</h1>
<p>task <b>{e(str(prov.get('task', '')))}</b> v{e(str(prov.get('task_version', '')))} ·
records scored {rec['scored']} · missing predictions {rec['missing']} · predictions not in gold {rec['extra_predictions']}
· malformed predictions {rec.get('malformed', 0)} · malformed gold {rec.get('malformed_gold', 0)}
· micro F1 <b id="micro-f1">{result['micro']['f1']:.4f}</b> · lenient (token overlap) micro F1 {lenient['f1']:.4f}</p>
{filter_form(list(result["classes"]), statuses_of(result))}
<h2>Per class</h2><table id="per-class"><thead>{head}</thead><tbody>{body}</tbody></table>
<h2>F1 per class</h2><div class="chart">{f1.svg}</div>
{conf_html}{field_confusion_html(result.get("confusion_fields") or {})}
{status_html(result)}
{error_records_html(result.get("errors"))}
<h2>Most frequent errors by class</h2>{examples_html(result["examples"])}
{failed_html(result.get("failed") or {})}
{grounding_html(result)}
<h2>Provenance</h2><pre>{e(prov_text(prov))}</pre>
{filter_script()}</body></html>
"""


def gold_free_page(result: dict, title: str) -> str:
    e = html.escape
    prov = result.get("provenance", {})
    fields = list(result["grounding"]["fields"])
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">{csp_meta()}<title>{e(title)}</title>
<style>{PAGE_CSS}{MARK_CSS}</style></head>
<body><h1>{e(title)}</h1>
<p>task <b>{e(str(prov.get('task', '')))}</b> v{e(str(prov.get('task_version', '')))} · no gold ·
predictions {result['records']['predictions']} · grounded rate
<b id="grounded-rate">{rate(result['grounding']['micro']['rate'])}</b></p>
{filter_form(fields, statuses_of(result), records=False)}
{grounding_html(result)}
{status_html(result)}
{failed_html(result.get("failed") or {})}
<h2>Provenance</h2><pre>{e(prov_text(prov))}</pre>
{filter_script()}</body></html>
"""
