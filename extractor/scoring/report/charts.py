"""The report's charts, drawn once with matplotlib (Agg) and kept twice: PNG bytes for the Markdown, an SVG
element for the HTML whose labels stay text (the viewing browser draws them with its own fonts)."""
from __future__ import annotations

import html
import io
import warnings

CJK_FONTS = ("WenQuanYi Zen Hei", "Noto Sans CJK SC", "Noto Sans SC", "Source Han Sans SC", "SimHei")


def pyplot():
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
    plt = pyplot()
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
    plt = pyplot()
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
