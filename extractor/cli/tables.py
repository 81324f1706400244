"""Rich tables shared by eval, compare, run and the demo, and the console they print on.

Cell text is data (class names are a model's labels, a task's field names), never rich markup: every cell
is a `Text`, so `[/x]` prints as itself. Columns fold rather than cut: a narrow console wraps a long class
name instead of printing `专业要…`."""
from __future__ import annotations

import os

from rich.console import Console
from rich.table import Table
from rich.text import Text

# Where output is not a terminal (a CI log, a pipe, a file), lines are as long as their content: a log is
# read after the fact and wrapped by whatever shows it.
UNBOUNDED_WIDTH = 10_000


def console(stderr: bool = False, quiet: bool = False) -> Console:
    """The console a command prints on: the terminal's width on a terminal; elsewhere unbounded, unless
    $COLUMNS sets a width."""
    con = Console(stderr=stderr, quiet=quiet)
    if not con.is_terminal and not os.environ.get("COLUMNS"):
        con.width = UNBOUNDED_WIDTH
    return con


def _table(*columns: str, title: str = "") -> Table:
    table = Table(title=title)
    for name in columns:
        table.add_column(name, overflow="fold")
    return table


def _row(table: Table, *cells, style: str | None = None) -> None:
    table.add_row(*(Text(str(cell)) for cell in cells), style=style)


def metrics_table(result: dict, title: str = "") -> Table:
    table = _table("class", "precision", "recall", "F1", "support", "TP", "FP", "FN", title=title)
    for cls, m in result["classes"].items():
        _row(table, cls, f"{m['precision']:.4f}", f"{m['recall']:.4f}", f"{m['f1']:.4f}", m["support"],
             m["tp"], m["fp"], m["fn"])
    table.add_section()
    micro = result["micro"]
    _row(table, "micro", f"{micro['precision']:.4f}", f"{micro['recall']:.4f}", f"{micro['f1']:.4f}",
         micro["support"], micro["tp"], micro["fp"], micro["fn"], style="bold")
    for name in ("macro", "weighted"):
        m = result[name]
        _row(table, name, f"{m['precision']:.4f}", f"{m['recall']:.4f}", f"{m['f1']:.4f}", "", "", "", "",
             style="bold")
    return table


def status_table(status_counts: dict, notes: dict | None = None) -> Table:
    """Records per status; `notes`: counts across statuses (records whose input was truncated), below."""
    table = _table("status", "records")
    for status, n in status_counts.items():
        _row(table, status, n)
    if notes:
        table.add_section()
        for what, n in notes.items():
            _row(table, what, n, style="dim")
    return table


def rows_table(columns: tuple[str, ...], rows) -> Table:
    """A plain table of data cells (task lists, field counts), escaped and folded like the others."""
    table = _table(*columns)
    for row in rows:
        _row(table, *row)
    return table
