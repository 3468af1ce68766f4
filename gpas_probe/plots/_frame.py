"""Selection and aggregation helpers shared by the plot functions.

Every plot reduces the long table to a few hundred points *before* drawing: rows are filtered one
column at a time (each filter scans only what the previous one kept) and duplicates are averaged
with a groupby. String columns may be plain strings or pandas categoricals.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.ticker import LogFormatter

from gpas_probe.store import check_table

GATE_SITES = ("gpas", "gpas_attn", "gpas_mlp")

STAT_NAMES = {"var": "variance", "rms": "RMS", "absmax": "max |x|", "grad_norm": "gradient norm",
              "weight_norm": "weight norm", "update_ratio": "update/weight ratio",
              "scale": "gate scale 1 − SiLU(α)", "alpha": "gate α", "silu_alpha": "SiLU(α)",
              "alpha_grad": "gate gradient ∂L/∂α", "shortcut_branch_ratio": "shortcut/branch RMS ratio",
              "shortcut_branch_cos": "cos(shortcut, branch)"}


class MissingDataError(ValueError):
    """The requested rows are not in the table (a ``ValueError``, so callers may catch either)."""


def check_frame(data: pd.DataFrame) -> None:
    """Raise ``ValueError`` unless ``data`` is a non-empty long table with the schema's columns."""
    check_table(data, MissingDataError)


def select(data: pd.DataFrame, **equal: Any) -> pd.DataFrame:
    """Rows where each named column equals the value (or is in the list/tuple/set); ``None`` skips a column.

    Filters apply in keyword order, each on the rows the previous one kept: put the most selective first.
    """
    out = data
    for column, want in equal.items():
        if want is None:
            continue
        col = out[column]
        if isinstance(want, (list, tuple, set, frozenset)):
            mask = col.isin(list(want))
        else:
            mask = col == want
        out = out[np.asarray(mask, dtype=bool)]
    return out


def blocks(data: pd.DataFrame) -> pd.DataFrame:
    """Only per-layer rows (``layer >= 0``)."""
    return data[data["layer"].to_numpy() >= 0]


def mean_by(data: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """Mean ``value`` per key combination (duplicates averaged), sorted, with string keys as ``str``."""
    if data.empty:
        return pd.DataFrame({**{k: pd.Series(dtype=object) for k in keys}, "value": pd.Series(dtype=float)})
    out = data.groupby(list(keys), observed=True, sort=True)["value"].mean().reset_index()
    for k in keys:
        if k in ("run_id", "site", "direction", "stat"):
            out[k] = out[k].astype(str)
    return out


def run_ids(data: pd.DataFrame) -> list[str]:
    """Run ids in order of first appearance."""
    return [str(r) for r in pd.unique(data["run_id"])]


def resolve_runs(data: pd.DataFrame, runs: Iterable[str] | None) -> list[str]:
    """``runs`` as a list (checked against the table), or every run in the table."""
    present = run_ids(data)
    if runs is None:
        return present
    runs = [str(r) for r in ([runs] if isinstance(runs, str) else runs)]
    unknown = [r for r in runs if r not in present]
    if unknown:
        raise ValueError(f"runs {unknown} are not in the data; runs present: {present}")
    if not runs:
        raise ValueError("runs is empty")
    return runs


def run_list(data: pd.DataFrame, runs: Iterable[str] | None) -> list[str]:
    """``runs`` as a list of strings (not checked: a run absent from ``data`` simply has no rows), or every run."""
    if runs is None:
        return run_ids(data)
    return [str(r) for r in ([runs] if isinstance(runs, str) else runs)]


def pick_run(data: pd.DataFrame, run: str | None) -> str:
    """The run to draw: ``run`` if given, else the table's only run."""
    if run is not None:
        return str(run)
    present = run_ids(data)
    if len(present) != 1:
        raise ValueError(f"data holds {len(present)} runs {present}; pass run= or use make_figure() for several")
    return present[0]


def subsample_steps(available: Iterable[int], max_steps: int) -> list[int]:
    """At most ``max_steps`` of the sorted unique steps, evenly spaced by rank, first and last included."""
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    steps = np.unique(np.asarray(list(available), dtype=np.int64))
    if len(steps) <= max_steps:
        return [int(s) for s in steps]
    if max_steps == 1:
        return [int(steps[-1])]
    idx = np.unique(np.linspace(0, len(steps) - 1, max_steps).round().astype(int))
    return [int(s) for s in steps[idx]]


def run_colors(runs: Sequence[str]) -> dict[str, tuple[float, float, float]]:
    """One qualitative colour per run, stable for a given run order."""
    palette = sns.color_palette("tab10", n_colors=max(len(runs), 1))
    return {r: tuple(palette[i % len(palette)]) for i, r in enumerate(runs)}


def quantity_label(site: str, direction: str, stat: str) -> str:
    """Human label of a statistic, e.g. ``variance of resid_post`` or ``RMS of ∂L/∂resid_post``."""
    name = STAT_NAMES.get(stat, stat)
    if direction == "bwd":
        return f"{name} of ∂L/∂{site}"
    if direction == "fwd":
        return f"{name} of {site}"
    return name


def annotate_missing(ax: Axes, message: str) -> None:
    """Write ``message`` in the middle of ``ax`` (the panel of a run without the requested data)."""
    ax.text(0.5, 0.5, message, transform=ax.transAxes, ha="center", va="center", wrap=True,
            fontsize="medium", color="0.3", bbox={"boxstyle": "round", "facecolor": "0.95", "edgecolor": "0.7"})


def positive(values: pd.Series | np.ndarray) -> np.ndarray:
    """Values as float with non-positive entries replaced by NaN (for log axes)."""
    arr = np.asarray(values, dtype=float).copy()
    arr[~(arr > 0)] = np.nan
    return arr


class PlainLogFormatter(LogFormatter):
    """Labels the ticks ``LogFormatter`` would label, written as plain numbers (``20``, ``0.0025``)."""

    def __call__(self, x: float, pos: int | None = None) -> str:
        return f"{x:.3g}" if super().__call__(x, pos) else ""


def log_y(ax: Axes) -> None:
    """Log-scale y axis labelled with plain numbers instead of ``2×10^1``."""
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(PlainLogFormatter())
    ax.yaxis.set_minor_formatter(PlainLogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))
