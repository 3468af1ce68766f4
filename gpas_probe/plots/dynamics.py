"""Quantities over training steps: GPAS gate trajectories and loss curves."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Colormap, Normalize
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from gpas_probe.plots.common import (
    STAT_NAMES,
    MissingDataError,
    annotate_missing,
    check_frame,
    draw_band,
    layer_norm,
    log_y,
    pick_run,
    run_colors,
    with_bounds,
)
from gpas_probe.plots.layout import layer_colorbar, spread
from gpas_probe.store.schema import GATE_SITES
from gpas_probe.table import gate_values, mean_by, run_list, select

logger = logging.getLogger(__name__)

GATE_STYLE = {"gpas": "-", "gpas_attn": "-", "gpas_mlp": "--"}
NO_GATES = "no GPAS gates in this run"


def _draw_gates(ax: Axes, table: pd.DataFrame, norm: Normalize, cmap: Colormap) -> None:
    sites = [s for s in GATE_SITES if s in set(table["site"])]
    for site in sites:
        part = table[table["site"] == site]
        for layer, rows in part.groupby("layer", sort=True):
            ax.plot(rows["step"].to_numpy(), rows["value"].to_numpy(), color=cmap(norm(layer)),
                    linestyle=GATE_STYLE[site], linewidth=1.2, marker="o" if len(rows) == 1 else None)
    if len(sites) > 1:
        handles = [Line2D([], [], color="0.3", linestyle=GATE_STYLE[s], label=s) for s in sites]
        ax.legend(handles=handles, title="gate", fontsize="small", title_fontsize="small", loc="best")


def gates(data: pd.DataFrame, ax: Axes | None = None, *, run: str | None = None, stat: str = "scale",
          palette: str = "viridis", colorbar: bool = True, norm: Normalize | None = None) -> Axes:
    """GPAS gate trajectories: ``stat`` (default the scale ``1 - SiLU(α)``) vs step, one line per layer.

    Lines are coloured by layer (sequential palette, colorbar); per-sub-layer gates draw attention solid
    and MLP dashed, and a layer recorded at one step only is a marker. A run without gate rows gets the
    text "no GPAS gates in this run" instead of lines (no error). ``norm`` fixes the layer colour scale,
    e.g. to share one colorbar across panels.
    """
    check_frame(data)
    run = pick_run(data, run)
    table = gate_values(select(data, run_id=run), stat)
    ax = plt.gca() if ax is None else ax
    ax.set_title(run)
    ax.set_xlabel("training step")
    ax.set_ylabel(STAT_NAMES[stat])
    if table.empty:
        annotate_missing(ax, NO_GATES)
        return ax
    cmap = sns.color_palette(palette, as_cmap=True)
    norm = layer_norm(table["layer"].to_numpy()) if norm is None else norm
    _draw_gates(ax, table, norm, cmap)
    ax.grid(True, alpha=0.3)
    if colorbar:
        layer_colorbar(ax.figure, ScalarMappable(norm=norm, cmap=cmap), ax)
    return ax


def smooth_window(points: int) -> int:
    """The rolling-mean window of a loss curve of ``points`` recorded points: the odd number nearest
    ``√points / 2`` (3 for 9–48 points, 9 for 300, 51 for 10,000); 1, no smoothing, under 9 points."""
    width = round(math.sqrt(max(points, 0)) / 2)
    return 1 if width < 2 else width | 1


def smoothed(values: pd.Series, window: int) -> pd.Series:
    """Centred rolling mean over ``window`` recorded points (shorter at both ends)."""
    return values.rolling(window, center=True, min_periods=1).mean() if window > 1 else values


def _loss_table(data: pd.DataFrame, runs: list[str], stats: list[str]) -> pd.DataFrame:
    return mean_by(select(data, stat=stats, site="model", run_id=runs), ["run_id", "stat", "step"])


def _one_point(ax: Axes, x: float, y: float, color: object, label: str) -> None:
    """A single recorded point: a marker labelled with its value."""
    ax.plot([x], [y], color=color, linestyle="none", marker="o", markersize=7, label=label)
    ax.annotate(f"{y:.4g} at step {int(x):,}", (x, y), xytext=(6, 6), textcoords="offset points",
                fontsize="small", color=color)


def _limits(ax: Axes, xs: np.ndarray, ys: np.ndarray, logy: bool) -> None:
    """Axis limits around the drawn points when they span no range (one step, one value)."""
    if len(xs) and xs.min() == xs.max():
        pad = max(1.0, abs(xs[0]) * 0.05)
        ax.set_xlim(xs[0] - pad, xs[0] + pad)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    finite = ys[np.isfinite(ys)]
    if len(finite) and finite.min() == finite.max() and not logy:
        ax.set_ylim(*spread(float(finite[0]), float(finite[0])))


def loss_curves(data: pd.DataFrame, ax: Axes | None = None, *, runs: Iterable[str] | None = None, val: bool = True,
                smooth: int | None = None, logy: bool = False, legend: bool = True) -> Axes:
    """Training loss vs step, one line per run, with ``val_loss`` as markers of the same colour (and a band
    where the rows carry bounds: a group of seeds, :func:`~gpas_probe.table.aggregate_runs`).

    ``smooth`` is a centred rolling-mean window (in recorded points): the raw curve is then drawn faint
    and the rolling mean solid, and the y label states the window. A run with one training-loss point
    draws it as a marker labelled with its value. Runs without loss rows are named in a note; if no run
    has any, ``MissingDataError``.
    """
    if smooth is not None and smooth < 1:
        raise ValueError(f"smooth must be >= 1, got {smooth}")
    check_frame(data)
    runs = run_list(data, runs)
    stats = ["loss", "val_loss"] if val else ["loss"]
    table = _loss_table(data, runs, stats)
    bounds = with_bounds(data, "loss", ["run_id", "step"], per_layer=False, site="model", run_id=runs)
    ax = plt.gca() if ax is None else ax
    colors = run_colors(runs)
    missing, banded = [], False
    window = smooth or 1
    for run in runs:
        rows = table[table["run_id"] == run]
        train = rows[rows["stat"] == "loss"]
        valid = rows[rows["stat"] == "val_loss"]
        if train.empty and valid.empty:
            missing.append(run)
            continue
        if len(train) == 1:
            _one_point(ax, float(train["step"].iloc[0]), float(train["value"].iloc[0]), colors[run], run)
        elif not train.empty:
            x = train["step"].to_numpy()
            if window > 1:
                ax.plot(x, train["value"].to_numpy(), color=colors[run], linewidth=0.8, alpha=0.3,
                        label=f"_{run} (raw)")
            ax.plot(x, smoothed(train["value"], window).to_numpy(), color=colors[run], linewidth=1.5, label=run)
            band = bounds[bounds["run_id"] == run]
            banded |= draw_band(ax, band["step"].to_numpy(), band["lo"], band["hi"], colors[run])
        if not valid.empty:
            ax.plot(valid["step"].to_numpy(), valid["value"].to_numpy(), color=colors[run], linestyle="none",
                    marker="D", markersize=6, markeredgecolor="black", markeredgewidth=0.7, zorder=3,
                    label=f"{run} (val)")
            if len(valid) == 1 and train.empty:
                ax.annotate(f"{float(valid['value'].iloc[0]):.4g}", (float(valid["step"].iloc[0]),
                            float(valid["value"].iloc[0])), xytext=(6, 6), textcoords="offset points",
                            fontsize="small", color=colors[run])
    if len(missing) == len(runs):
        raise MissingDataError(f"no run has {' or '.join(stats)} rows (site 'model'); runs: {runs}")
    if logy:
        log_y(ax)
    _limits(ax, table["step"].to_numpy(dtype=float), table["value"].to_numpy(dtype=float), logy)
    ax.set_xlabel("training step")
    ylabel = "loss (nats/token" + (", log scale)" if logy else ")")
    ax.set_ylabel(ylabel if window == 1 else f"{ylabel}\nsolid: rolling mean of {window} points, faint: raw")
    ax.set_title("training loss" + (" (lines) and validation loss (markers)" if val else "")
                 + ("; bands: 95% intervals" if banded else ""))
    ax.grid(True, alpha=0.3)
    if missing:
        ax.text(0.01, 0.01, f"no loss: {', '.join(missing)}", transform=ax.transAxes, fontsize="small", color="0.35")
    if legend:
        ax.legend(fontsize="small", loc="best", framealpha=0.8)
    return ax


def loss_differences(data: pd.DataFrame, ax: Axes | None = None, *, runs: Iterable[str] | None = None,
                     smooth: int = 1, legend: bool = True) -> Axes:
    """Each run's training loss minus the first run's (the first run with loss rows, the reference), both
    smoothed by a centred rolling mean of ``smooth`` recorded points, with a zero line in the reference's
    colour. The reference is read at each run's steps (linear interpolation between its recorded steps;
    steps outside its range are left out). Needs two runs with training loss, else ``MissingDataError``.
    """
    check_frame(data)
    runs = run_list(data, runs)
    table = _loss_table(data, runs, ["loss"])
    curves = {run: rows for run in runs if not (rows := table[table["run_id"] == run]).empty}
    if len(curves) < 2:
        raise MissingDataError(f"a loss difference needs two runs with 'loss' rows; runs with them: {list(curves)}")
    ax = plt.gca() if ax is None else ax
    colors = run_colors(runs)
    (ref, base), *others = curves.items()
    base_x, base_y = base["step"].to_numpy(dtype=float), smoothed(base["value"], smooth).to_numpy()
    ax.axhline(0.0, color=colors[ref], linewidth=1.0, label=f"{ref} (reference)")
    xs: list[float] = []
    for run, rows in others:
        x = rows["step"].to_numpy(dtype=float)
        inside = (x >= base_x.min()) & (x <= base_x.max())
        diff = smoothed(rows["value"], smooth).to_numpy()[inside] - np.interp(x[inside], base_x, base_y)
        xs += list(x[inside])
        ax.plot(x[inside], diff, color=colors[run], linewidth=1.5, label=run,
                marker="o" if inside.sum() == 1 else None)
    _limits(ax, np.asarray(xs, dtype=float), np.empty(0), logy=False)
    ax.set_xlabel("training step")
    what = "" if smooth == 1 else f", rolling mean of {smooth} points"
    ax.set_ylabel(f"loss − loss of {ref}{what}")
    ax.set_title(f"difference from {ref} (below 0: lower loss)")
    ax.grid(True, alpha=0.3)
    if legend:
        ax.legend(fontsize="small", loc="best", framealpha=0.8)
    return ax


__all__ = ["NO_GATES", "MissingDataError", "gates", "loss_curves", "loss_differences", "smooth_window"]
