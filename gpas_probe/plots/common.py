"""What the plot functions share: the missing-data error, labels, colours, log axes, the choice of
steps and runs to draw. Selecting and averaging rows is :mod:`gpas_probe.table`'s."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.axis import Axis
from matplotlib.colors import Normalize
from matplotlib.ticker import LogFormatter

from gpas_probe.store.schema import check_table
from gpas_probe.table import layer_rows, mean_by, run_ids, select

STAT_NAMES = {"var": "variance", "rms": "RMS", "absmax": "max |x|", "grad_norm": "gradient norm",
              "weight_norm": "weight norm", "update_ratio": "update/weight ratio",
              "scale": "gate scale 1 − SiLU(α)", "alpha": "gate α", "silu_alpha": "SiLU(α)",
              "alpha_grad": "gate gradient ∂L/∂α", "shortcut_branch_ratio": "shortcut/branch RMS ratio",
              "shortcut_branch_cos": "cos(shortcut, branch)", "var_robust": "variance without outlier tokens",
              "rms_robust": "RMS without outlier tokens", "absmax_robust": "max |x| without outlier tokens"}
#: The activation statistics the variance and heatmap figures may draw.
ACTIVATION_STATS = ("var", "rms", "absmax", "var_robust", "rms_robust", "absmax_robust")


class MissingDataError(ValueError):
    """The requested rows are not in the table (a ``ValueError``, so callers may catch either)."""


class OneStepError(MissingDataError):
    """A view over steps was asked of rows recorded at one step only; ``panel`` is the short text of the
    run's panel in a whole figure, naming the figure that draws one step."""

    def __init__(self, message: str, panel: str) -> None:
        super().__init__(message)
        self.panel = panel


def check_frame(data: pd.DataFrame) -> None:
    """Raise ``ValueError`` unless ``data`` is a non-empty long table with the schema's columns."""
    check_table(data, MissingDataError)


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


def _plain_log(axis: Axis) -> None:
    """Label a log-scaled axis with plain numbers instead of ``2×10^1``."""
    axis.set_major_formatter(PlainLogFormatter())
    axis.set_minor_formatter(PlainLogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))


def log_y(ax: Axes) -> None:
    """Log-scale y axis labelled with plain numbers instead of ``2×10^1``."""
    ax.set_yscale("log")
    _plain_log(ax.yaxis)


def log_x(ax: Axes) -> None:
    """Log-scale x axis labelled with plain numbers."""
    ax.set_xscale("log")
    _plain_log(ax.xaxis)


def layer_norm(layers: np.ndarray) -> Normalize:
    """A colour scale over the layer indices present (one layer: a unit range, never empty)."""
    lo, hi = (float(layers.min()), float(layers.max())) if len(layers) else (0.0, 1.0)
    return Normalize(vmin=lo, vmax=hi if hi > lo else lo + 1)


def with_bounds(data: pd.DataFrame, stat: str, keys: Sequence[str], *, per_layer: bool = True,
                **equal: object) -> pd.DataFrame:
    """Mean ``value`` of ``stat`` rows (per-layer ones unless ``per_layer=False``) per ``keys`` (rows chosen
    by ``equal``, see :func:`~gpas_probe.table.select`), with columns ``lo`` and ``hi`` from its
    ``{stat}_lo``/``{stat}_hi`` rows where recorded (a profile's intervals, or the spread across seeds of
    :func:`~gpas_probe.table.aggregate_runs`; NaN elsewhere)."""
    rows = select(data, stat=[stat, f"{stat}_lo", f"{stat}_hi"], **equal)
    rows = layer_rows(rows) if per_layer else rows
    table = mean_by(rows, [*keys, "stat"])
    out = table[table["stat"] == stat].drop(columns="stat").reset_index(drop=True)
    for end in ("lo", "hi"):
        part = table[table["stat"] == f"{stat}_{end}"].drop(columns="stat").rename(columns={"value": end})
        out = out.merge(part, on=list(keys), how="left") if len(part) else out.assign(**{end: np.nan})
    return out


def draw_band(ax: Axes, x: np.ndarray, lo: pd.Series, hi: pd.Series, color: object) -> bool:
    """A 95% band between ``lo`` and ``hi`` (nothing where they were not recorded); True when drawn."""
    if not lo.notna().any():
        return False
    ax.fill_between(x, lo.to_numpy(dtype=float), hi.to_numpy(dtype=float), color=color, alpha=0.2,
                    linewidth=0, label="_95% interval")
    return True
