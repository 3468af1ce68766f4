"""Depth profiles: variance growth, the layer × step heatmap, shortcut/branch ratios, gradient norms."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.ticker import MaxNLocator

from gpas_probe.plots.common import (
    MissingDataError,
    check_frame,
    draw_band,
    log_y,
    pick_run,
    positive,
    quantity_label,
    run_colors,
    subsample_steps,
    with_bounds,
)
from gpas_probe.table import layer_rows, mean_by, run_list, select

logger = logging.getLogger(__name__)

SITE_STYLE = {"attn": ("-", "o"), "mlp": ("--", "s")}

# view -> (site or None for the ``site`` argument, direction, stat)
GRAD_VIEWS = {
    "fwd": (None, "fwd", "rms"),
    "bwd": (None, "bwd", "rms"),
    "params": ("params", "none", "grad_norm"),
}


def _layer_axis(ax: Axes) -> None:
    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _note_missing(ax: Axes, missing: Sequence[str], what: str) -> None:
    if missing:
        ax.text(0.01, 0.01, f"no {what}: {', '.join(missing)}", transform=ax.transAxes, ha="left", va="bottom",
                fontsize="small", color="0.35")


def variance_growth(data: pd.DataFrame, ax: Axes | None = None, *, run: str | None = None,
                    site: str = "resid_post", direction: str = "fwd", stat: str = "var",
                    steps: Iterable[int] | None = None, max_steps: int = 8, palette: str = "viridis",
                    legend: bool = True) -> Axes:
    """Statistic by layer (log y), one line per recorded step, coloured dark (early) to light (late), with a
    band for its 95% interval where a profile recorded one (``var_robust`` has one).

    ``steps=None`` picks at most ``max_steps`` recorded steps evenly by rank, first and last included;
    explicit ``steps`` must all be recorded. Raises ``MissingDataError`` (a ``ValueError``) when the run
    has no such rows.
    """
    check_frame(data)
    run = pick_run(data, run)
    table = with_bounds(data, stat, ["step", "layer"], site=site, direction=direction, run_id=run)
    what = quantity_label(site, direction, stat)
    if table.empty:
        raise MissingDataError(f"run {run!r} has no {stat!r} rows at site {site!r}, direction {direction!r}")
    available = table["step"].unique()
    if steps is None:
        chosen = subsample_steps(available, max_steps)
    else:
        chosen = sorted({int(s) for s in steps})
        absent = sorted(set(chosen) - {int(s) for s in available})
        if absent:
            raise MissingDataError(f"run {run!r} has no {what} at steps {absent}")
    ax = plt.gca() if ax is None else ax
    cmap = sns.color_palette(palette, as_cmap=True)
    for i, step in enumerate(chosen):
        rows = table[table["step"] == step]
        shade = 0.9 * i / max(len(chosen) - 1, 1)
        ax.plot(rows["layer"].to_numpy(), positive(rows["value"]), color=cmap(shade), marker="o", markersize=3,
                linewidth=1.6, label=f"{step:,}")
        draw_band(ax, rows["layer"].to_numpy(), rows["lo"], rows["hi"], cmap(shade))
    log_y(ax)
    _layer_axis(ax)
    ax.set_ylabel(f"{what} (log scale)")
    ax.set_title(run)
    ax.grid(True, which="major", alpha=0.3)
    if legend:
        ax.legend(title="step", fontsize="small", title_fontsize="small", ncols=1 if len(chosen) <= 5 else 2,
                  loc="best", framealpha=0.8)
    return ax


def variance_heatmap(data: pd.DataFrame, ax: Axes | None = None, *, run: str | None = None,
                     site: str = "resid_post", direction: str = "fwd", stat: str = "var", cmap: str = "magma",
                     vmin: float | None = None, vmax: float | None = None, colorbar: bool = True) -> Axes:
    """Heatmap of ``log10(stat)`` with layers on y (layer 0 at the bottom) and recorded steps on x.

    Non-positive values are left blank. ``vmin``/``vmax`` (in log10 units) fix the colour range, e.g. to
    compare runs. Raises ``MissingDataError`` when the run has no such rows.
    """
    check_frame(data)
    run = pick_run(data, run)
    table = mean_by(layer_rows(select(data, stat=stat, site=site, direction=direction, run_id=run)), ["step", "layer"])
    if table.empty:
        raise MissingDataError(f"run {run!r} has no {stat!r} rows at site {site!r}, direction {direction!r}")
    grid = table.pivot(index="layer", columns="step", values="value")
    logged = np.log10(grid.where(grid > 0))
    ax = plt.gca() if ax is None else ax
    what = quantity_label(site, direction, stat)
    every_layer = max(1, math.ceil(grid.shape[0] / 12))  # at most ~12 tick labels per axis
    every_step = max(1, math.ceil(grid.shape[1] / 12))
    sns.heatmap(logged, ax=ax, cmap=cmap, vmin=vmin, vmax=vmax, cbar=colorbar, xticklabels=every_step,
                yticklabels=every_layer, cbar_kws={"label": f"log10 {what}"} if colorbar else None)
    ax.invert_yaxis()
    ax.set_xlabel("training step")
    ax.set_ylabel("layer")
    ax.set_title(run)
    ax.tick_params(axis="x", labelrotation=45)
    ax.tick_params(axis="y", labelrotation=0)
    return ax


def _last_steps(frame: pd.DataFrame, last: int) -> tuple[pd.DataFrame, list[int]]:
    steps = sorted(frame["step"].unique())[-last:]
    return frame[frame["step"].isin(steps)], [int(s) for s in steps]


def _start(ax: Axes | None, runs: list[str]) -> tuple[Axes, dict[str, Any], list[str], dict[str, list[int]]]:
    """What a comparison view starts from: its Axes, the runs' colours, and empty lists of the runs
    without data and of the steps drawn per run."""
    return plt.gca() if ax is None else ax, run_colors(runs), [], {}


def _by_run(table: pd.DataFrame, runs: list[str], missing: list[str]) -> Iterator[tuple[str, pd.DataFrame]]:
    """Each run's rows of ``table``; runs without any are added to ``missing``."""
    for run in runs:
        rows = table[table["run_id"] == run]
        if rows.empty:
            missing.append(run)
        else:
            yield run, rows


def _steps_text(steps_by_run: dict[str, list[int]]) -> str:
    spans = {(s[0], s[-1]) for s in steps_by_run.values()}
    if len(spans) == 1:
        lo, hi = spans.pop()
        return f"step {hi:,}" if lo == hi else f"mean over steps {lo:,}–{hi:,}"
    return "each run's last step" if all(len(s) == 1 for s in steps_by_run.values()) else "each run's last steps"


def shortcut_ratio(data: pd.DataFrame, ax: Axes | None = None, *, runs: Iterable[str] | None = None,
                   sites: Sequence[str] = ("attn", "mlp"), stat: str = "shortcut_branch_ratio",
                   step: int | None = None, legend: bool = True) -> Axes:
    """Shortcut/branch ratio by layer, one line per run (colour) and sub-layer (line style), log y, with a
    band for its 95% interval where a profile recorded one (``shortcut_branch_ratio_robust``).

    Drawn at each run's last recorded step, or at ``step``. ``stat='shortcut_branch_cos'`` draws the cosine
    on a linear axis. Runs without the rows are named in a note; if no run has them, ``MissingDataError``.
    """
    check_frame(data)
    runs = run_list(data, runs)
    table = with_bounds(data, stat, ["run_id", "step", "site", "layer"], direction="fwd", site=list(sites),
                        run_id=runs)
    ax, colors, missing, steps_by_run = _start(ax, runs)
    for run, rows in _by_run(table, runs, missing):
        chosen = int(rows["step"].max()) if step is None else int(step)
        rows = rows[rows["step"] == chosen]
        if rows.empty:
            missing.append(run)
            continue
        steps_by_run[run] = [chosen]
        for site in sites:
            part = rows[rows["site"] == site]
            if part.empty:
                continue
            style, marker = SITE_STYLE.get(site, ("-.", "^"))
            values = part["value"].to_numpy() if stat.endswith("cos") else positive(part["value"])
            ax.plot(part["layer"].to_numpy(), values, color=colors[run], linestyle=style, marker=marker,
                    markersize=3.5, linewidth=1.6, label=f"{run} · {site}")
            draw_band(ax, part["layer"].to_numpy(), part["lo"], part["hi"], colors[run])
    if not steps_by_run:
        where = "" if step is None else f" at step {step}"
        raise MissingDataError(f"no run has {stat!r} rows for sites {list(sites)}{where}; runs: {runs}")
    if not stat.endswith("cos"):
        log_y(ax)
    _layer_axis(ax)
    ax.set_ylabel(quantity_label("", "none", stat) + ("" if stat.endswith("cos") else " (log scale)"))
    ax.set_title(f"{quantity_label('', 'none', stat)} at {_steps_text(steps_by_run)}")
    ax.grid(True, which="major", alpha=0.3)
    _note_missing(ax, missing, stat)
    if legend:
        ax.legend(fontsize="small", loc="best", framealpha=0.8)
    return ax


def grad_norm(data: pd.DataFrame, ax: Axes | None = None, *, view: str = "params", runs: Iterable[str] | None = None,
              site: str = "resid_post", last: int = 1, legend: bool = True) -> Axes:
    """Gradient (or activation) size by layer, one line per run, log y, averaged over the last ``last`` steps
    (with a band where the rows carry bounds: a group of seeds, :func:`~gpas_probe.table.aggregate_runs`).

    ``view``: ``'params'`` the per-layer parameter gradient norm; ``'bwd'`` the RMS of the gradient with
    respect to ``site`` (backward view); ``'fwd'`` the RMS of the activation at ``site`` (forward view).
    Runs without the rows are named in a note; if no run has them, ``MissingDataError``.
    """
    if view not in GRAD_VIEWS:
        raise ValueError(f"view must be one of {sorted(GRAD_VIEWS)}, got {view!r}")
    if last < 1:
        raise ValueError(f"last must be >= 1, got {last}")
    check_frame(data)
    runs = run_list(data, runs)
    fixed_site, direction, stat = GRAD_VIEWS[view]
    site = fixed_site or site
    table = with_bounds(data, stat, ["run_id", "step", "layer"], site=site, direction=direction, run_id=runs)
    ax, colors, missing, steps_by_run = _start(ax, runs)
    for run, rows in _by_run(table, runs, missing):
        rows, steps_by_run[run] = _last_steps(rows, last)
        profile = rows.groupby("layer", sort=True)[["value", "lo", "hi"]].mean()
        ax.plot(profile.index.to_numpy(), positive(profile["value"].to_numpy()), color=colors[run], marker="o",
                markersize=3.5, linewidth=1.6, label=run)
        draw_band(ax, profile.index.to_numpy(), profile["lo"], profile["hi"], colors[run])
    what = "parameter gradient norm" if view == "params" else quantity_label(site, direction, stat)
    if not steps_by_run:
        raise MissingDataError(f"no run has {what} ({stat!r} at {site!r}, {direction!r}); runs: {runs}")
    log_y(ax)
    _layer_axis(ax)
    ax.set_ylabel(f"{what} (log scale)")
    titles = {"fwd": "forward view", "bwd": "backward view", "params": "parameter gradients"}
    ax.set_title(f"{titles[view]}, {_steps_text(steps_by_run)}")
    ax.grid(True, which="major", alpha=0.3)
    _note_missing(ax, missing, what)
    if legend:
        ax.legend(title="run", fontsize="small", title_fontsize="small", loc="best", framealpha=0.8)
    return ax
