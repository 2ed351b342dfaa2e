"""Terminal rendering of result tables (rich)."""

from __future__ import annotations

import math

import pandas as pd
from rich.console import Console
from rich.table import Table


def _fmt(value) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def render(df: pd.DataFrame, title: str = "", console: Console | None = None) -> None:
    console = console or Console()
    if not console.is_terminal:
        console.width = max(console.width, 200)  # logs and pipes: never squeeze the columns
    if df.empty:
        console.print("[yellow]no results yet[/yellow]")
        return
    table = Table(title=title or None, show_lines=False)
    for col in df.columns:
        table.add_column(col, justify="right" if df[col].dtype.kind in "fiu" else "left")
    for row in df.itertuples(index=False):
        table.add_row(*map(_fmt, row))
    console.print(table)


def markdown(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (for READMEs and notes), no extra dependency."""
    if df.empty:
        return "_no results_"
    head = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "|" + "|".join("---:" if df[c].dtype.kind in "fiu" else "---" for c in df.columns) + "|"
    body = ["| " + " | ".join(map(_fmt, row)) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, rule, *body])
