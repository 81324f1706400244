"""Rich tables shared by eval, compare and the demo."""
from __future__ import annotations

from rich.table import Table


def metrics_table(result: dict, title: str = "") -> Table:
    table = Table("class", "precision", "recall", "F1", "support", "TP", "FP", "FN", title=title)
    for cls, m in result["classes"].items():
        table.add_row(cls, f"{m['precision']:.4f}", f"{m['recall']:.4f}", f"{m['f1']:.4f}", str(m["support"]),
                      str(m["tp"]), str(m["fp"]), str(m["fn"]))
    table.add_section()
    micro = result["micro"]
    table.add_row("micro", f"{micro['precision']:.4f}", f"{micro['recall']:.4f}", f"{micro['f1']:.4f}",
                  str(micro["support"]), str(micro["tp"]), str(micro["fp"]), str(micro["fn"]), style="bold")
    for name in ("macro", "weighted"):
        m = result[name]
        table.add_row(name, f"{m['precision']:.4f}", f"{m['recall']:.4f}", f"{m['f1']:.4f}", "", "", "", "",
                      style="bold")
    return table


def status_table(status_counts: dict) -> Table:
    table = Table("status", "records")
    for status, n in status_counts.items():
        table.add_row(status, str(n))
    return table
