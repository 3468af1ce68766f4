"""Quantities over training steps: GPAS gate trajectories and loss curves."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Colormap, Normalize
from matplotlib.lines import Line2D

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
                    linestyle=GATE_STYLE[site], linewidth=1.2)
    if len(sites) > 1:
        handles = [Line2D([], [], color="0.3", linestyle=GATE_STYLE[s], label=s) for s in sites]
        ax.legend(handles=handles, title="gate", fontsize="small", title_fontsize="small", loc="best")


def gates(data: pd.DataFrame, ax: Axes | None = None, *, run: str | None = None, stat: str = "scale",
          palette: str = "viridis", colorbar: bool = True, norm: Normalize | None = None) -> Axes:
    """GPAS gate trajectories: ``stat`` (default the scale ``1 - SiLU(α)``) vs step, one line per layer.

    Lines are coloured by layer (sequential palette, colorbar); per-sub-layer gates draw attention solid
    and MLP dashed. A run without gate rows gets the text "no GPAS gates in this run" instead of lines
    (no error). ``norm`` fixes the layer colour scale, e.g. to share one colorbar across panels.
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
        ax.figure.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="layer")
    return ax


def loss_curves(data: pd.DataFrame, ax: Axes | None = None, *, runs: Iterable[str] | None = None, val: bool = True,
                smooth: int | None = None, logy: bool = False, legend: bool = True) -> Axes:
    """Training loss vs step, one line per run, with ``val_loss`` as markers of the same colour (and a band
    where the rows carry bounds: a group of seeds, :func:`~gpas_probe.table.aggregate_runs`).

    ``smooth`` is a centred rolling-mean window (in recorded points) for the training loss. Runs without
    loss rows are named in a note; if no run has any, ``MissingDataError``.
    """
    if smooth is not None and smooth < 1:
        raise ValueError(f"smooth must be >= 1, got {smooth}")
    check_frame(data)
    runs = run_list(data, runs)
    stats = ["loss", "val_loss"] if val else ["loss"]
    table = mean_by(select(data, stat=stats, site="model", run_id=runs), ["run_id", "stat", "step"])
    bounds = with_bounds(data, "loss", ["run_id", "step"], per_layer=False, site="model", run_id=runs)
    ax = plt.gca() if ax is None else ax
    colors = run_colors(runs)
    missing, banded = [], False
    for run in runs:
        rows = table[table["run_id"] == run]
        train = rows[rows["stat"] == "loss"]
        valid = rows[rows["stat"] == "val_loss"]
        if train.empty and valid.empty:
            missing.append(run)
            continue
        if not train.empty:
            y = train["value"]
            if smooth:
                y = y.rolling(smooth, center=True, min_periods=1).mean()
            ax.plot(train["step"].to_numpy(), y.to_numpy(), color=colors[run], linewidth=1.5, label=run)
            band = bounds[bounds["run_id"] == run]
            banded |= draw_band(ax, band["step"].to_numpy(), band["lo"], band["hi"], colors[run])
        if not valid.empty:
            ax.plot(valid["step"].to_numpy(), valid["value"].to_numpy(), color=colors[run], linestyle="none",
                    marker="D", markersize=6, markeredgecolor="black", markeredgewidth=0.7, zorder=3,
                    label=f"{run} (val)")
    if len(missing) == len(runs):
        raise MissingDataError(f"no run has {' or '.join(stats)} rows (site 'model'); runs: {runs}")
    if logy:
        log_y(ax)
    ax.set_xlabel("training step")
    ylabel = "loss (nats/token" + (", log scale)" if logy else ")")
    ax.set_ylabel(ylabel if not smooth else f"{ylabel}, rolling mean of {smooth}")
    ax.set_title("training loss" + (" (lines) and validation loss (markers)" if val else "")
                 + ("; bands: 95% intervals" if banded else ""))
    ax.grid(True, alpha=0.3)
    if missing:
        ax.text(0.01, 0.01, f"no loss: {', '.join(missing)}", transform=ax.transAxes, fontsize="small", color="0.35")
    if legend:
        ax.legend(fontsize="small", loc="best", framealpha=0.8)
    return ax


__all__ = ["NO_GATES", "MissingDataError", "gates", "loss_curves"]
