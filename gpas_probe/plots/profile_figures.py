"""Whole figures of the rows a profile writes: importance bars, the angular triangle, importance over
training."""

from __future__ import annotations

from collections.abc import Iterable

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.cm import ScalarMappable
from matplotlib.figure import Figure

from gpas_probe.plots.common import MissingDataError, check_frame
from gpas_probe.plots.importance import (
    ANGULAR_PREFIX,
    ANGULAR_RAW,
    ANGULAR_SCALED,
    IMPORTANCE_SITE,
    MIN_ROW_CELLS,
    PROFILE_HINT,
    angular_heatmap,
    colorbar_ticks,
    importance_bars,
    importance_label,
    importance_over_training,
    symlog_norm,
)
from gpas_probe.plots.layout import at_least_two_ticks, finite_range, panels, per_run
from gpas_probe.table import layer_rows, mean_by, resolve_runs, select


def _profiled(sub: pd.DataFrame, runs: list[str], what: str) -> pd.DataFrame:
    if sub.empty:
        raise MissingDataError(f"no run has {what} (runs: {runs}); {PROFILE_HINT}")
    return sub


def importance_figure(data: pd.DataFrame, runs: Iterable[str] | None = None, *,
                      stats: Iterable[str] = ("deletion_delta", "block_influence"), stat: str | None = None,
                      step: int | None = None) -> Figure:
    """One ``importance_bars`` panel per importance statistic (default deletion cost and block influence;
    ``stat`` draws that one only), every run side by side in each panel. A statistic no run has is left
    out; if no run was profiled, ``MissingDataError`` telling the user to run ``gpas-probe profile``."""
    check_frame(data)
    runs = resolve_runs(data, runs)
    stats = [stat] if stat is not None else list(stats)
    sub = _profiled(layer_rows(select(data, site=IMPORTANCE_SITE, stat=stats, run_id=runs)), runs,
                    f"layer-importance rows ({', '.join(stats)})")
    present = [s for s in stats if (sub["stat"] == s).any()]
    num_layers = int(sub["layer"].max()) + 1
    width = min(14.0, max(7.0, 0.3 * num_layers * max(1.0, len(runs) / 2) + 2))
    fig, grid = plt.subplots(len(present), 1, figsize=(width, 3.4 * len(present)), squeeze=False, sharex=True,
                             layout="constrained")
    axes = list(grid[:, 0])
    for ax, name in zip(axes, present, strict=True):
        try:
            importance_bars(sub, ax=ax, stat=name, runs=runs, step=step, legend=len(runs) > 1)
        except MissingDataError:
            plt.close(fig)
            raise
        ax.set_title(importance_label(name).split(" (")[0] + f", {ax.get_title()}", fontsize="medium")
        if ax is not axes[-1]:
            ax.set_xlabel("")
    fig.suptitle("which layers matter? (higher = the model needs the layer more)")
    return fig


def angular_figure(data: pd.DataFrame, runs: Iterable[str] | None = None, *, normalized: bool = True,
                   step: int | None = None, layers: Iterable[int] | None = None, cmap: str = "viridis") -> Figure:
    """One ``angular_heatmap`` triangle per run (Mix-LN style) with one shared colour scale and colorbar;
    in the scaled view (default) the rows with fewer than ``MIN_ROW_CELLS`` cells are hatched."""
    check_frame(data)
    runs = resolve_runs(data, runs)
    sub = layer_rows(select(data, stat=["angular_distance", "angular_distance_norm"], run_id=runs))
    sub = _profiled(sub[np.asarray(sub["site"].astype(str).str.startswith(ANGULAR_PREFIX), dtype=bool)], runs,
                    "angular-distance rows")
    vmin, vmax = (0.0, 1.0) if normalized else finite_range(select(sub, stat="angular_distance")["value"].to_numpy())
    layers = None if layers is None else list(layers)
    fig, axes = panels(len(runs), width=5.0, height=4.4)
    per_run(fig, axes, runs,
            lambda ax, run: angular_heatmap(sub, ax=ax, run=run, normalized=normalized, step=step, layers=layers,
                                            cmap=cmap, vmin=vmin, vmax=vmax, colorbar=False),
            lambda run: f"no angular distances: {PROFILE_HINT}")
    label = f"{ANGULAR_SCALED}\n(hatched: n with < {MIN_ROW_CELLS} cells)" if normalized else ANGULAR_RAW
    mappable = ScalarMappable(cmap=sns.color_palette(cmap, as_cmap=True), norm=plt.Normalize(vmin, vmax))
    fig.colorbar(mappable, ax=axes, label=label, shrink=0.9)
    fig.suptitle(r"angular distance between $h_l$ and $h_{l+n}$ (dark: the block changes the stream least)")
    return fig


def importance_steps_figure(data: pd.DataFrame, runs: Iterable[str] | None = None, *,
                            stat: str = "deletion_delta", cmap: str = "viridis", log: bool = True) -> Figure:
    """One ``importance_over_training`` layer × checkpoint-step heatmap per run, one shared colour scale
    (symmetric-log unless ``log=False``) in a colour bar under the panels, where its label has the width
    of the figure. A run profiled at one step only gets a panel saying so; when every run has one step,
    ``MissingDataError`` pointing to the importance figure."""
    check_frame(data)
    runs = resolve_runs(data, runs)
    sub = _profiled(layer_rows(select(data, stat=stat, site=IMPORTANCE_SITE, run_id=runs)), runs,
                    f"{stat!r} layer-importance rows")
    values = mean_by(sub, ["run_id", "step", "layer"])["value"].to_numpy()
    vmin, vmax = finite_range(values)
    norm = symlog_norm(values, vmin, vmax) if log else plt.Normalize(vmin, vmax)
    fig, axes = panels(len(runs), width=5.0, height=4.6)
    per_run(fig, axes, runs,
            lambda ax, run: importance_over_training(sub, ax=ax, run=run, stat=stat, cmap=cmap, vmin=vmin,
                                                     vmax=vmax, log=log, colorbar=False),
            lambda run: f"no layer importance: {PROFILE_HINT}")
    mappable = ScalarMappable(cmap=sns.color_palette(cmap, as_cmap=True), norm=norm)
    cbar = fig.colorbar(mappable, ax=axes, location="bottom", shrink=0.9, aspect=40,
                        label=importance_label(stat) + (", symlog scale" if log else ""),
                        **colorbar_ticks(norm))
    at_least_two_ticks(cbar, norm)
    fig.suptitle("layer importance over training,\none column per profiled checkpoint")
    return fig
