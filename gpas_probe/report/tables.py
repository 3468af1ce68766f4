"""Plain tables of text, as a report shows them: what a cell says, whether it is bold, its style class; no
markup (the page escapes every string when it writes the table)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class Cell:
    """One cell: its text, bold or not, and a style class (``''`` for none)."""

    text: str
    bold: bool = False
    style: str = ""


@dataclass
class Table:
    """A table: a title, column headers, rows of cells; ``rules`` holds the indices of the rows after which
    a rule is drawn (the diagnosis's deep half); ``left`` the columns aligned left (the others are numbers)."""

    columns: list[str]
    rows: list[list[Cell]] = field(default_factory=list)
    title: str = ""
    rules: set[int] = field(default_factory=set)
    left: set[int] = field(default_factory=lambda: {0})

    def add(self, *cells: Cell | str, rule: bool = False) -> None:
        self.rows.append([c if isinstance(c, Cell) else Cell(str(c)) for c in cells])
        if rule:
            self.rules.add(len(self.rows) - 1)


def number(value: object) -> str:
    """A number as the CLI's tables print it: four significant digits, ``-`` for NaN; other values as text."""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (float, np.floating)):
        return "-" if value != value else f"{value:.4g}"
    return str(value)


def frame_table(df: pd.DataFrame, title: str, labels: Mapping[str, str] | None = None) -> Table:
    """A DataFrame as a table: its index first (named by the index's name), then its columns renamed by
    ``labels``, each value as :func:`number` writes it."""
    labels = labels or {}
    out = Table([str(df.index.name or ""), *(labels.get(str(c), str(c)) for c in df.columns)], title=title)
    for idx, row in zip(df.index, df.itertuples(index=False), strict=True):
        out.add(str(idx), *(number(v) for v in row))
    return out


def bounds(lo: float, hi: float, fmt: str = "{:.3f}") -> str:
    """``[lo, hi]`` with ``fmt``, or ``-`` without bounds."""
    return "-" if lo != lo else f"[{fmt.format(lo)}, {fmt.format(hi)}]"
