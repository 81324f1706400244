"""The report page's CSS and the font stack its charts' labels are drawn with."""
from __future__ import annotations

# The browser's font stack for chart labels: common CJK fonts on each OS, then the generic family.
BROWSER_FONTS = ("system-ui, -apple-system, 'Segoe UI', 'Noto Sans', 'Noto Sans CJK SC', 'PingFang SC', "
                 "'Microsoft YaHei', 'WenQuanYi Zen Hei', 'Source Han Sans SC', sans-serif")

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

MARK_CSS = ("mark{background:#ffe08a;color:#000}mark.normalized{background:#c9e7ff}mark.fuzzy{background:#f3c9ff}"
            ".copied{color:#b00}")
