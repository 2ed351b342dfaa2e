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
