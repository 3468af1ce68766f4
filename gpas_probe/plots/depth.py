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
from matplotlib.scale import SymmetricalLogTransform
from matplotlib.ticker import FuncFormatter, MaxNLocator

from gpas_probe.plots.common import (
    MissingDataError,
    OneStepError,
    check_frame,
    draw_band,
    log_x,
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
    explicit ``steps`` must all be recorded. The legend, outside the Axes on the right so that it hides no
    line, is titled with how many of the recorded steps are drawn ("step (8 of 21 recorded)"). Raises
    ``MissingDataError`` (a ``ValueError``) when the run has no such rows.
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
        ax.legend(title=steps_title(len(chosen), len(available)), fontsize="small", title_fontsize="small",
                  ncols=1 if len(chosen) <= 12 else 2, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                  borderaxespad=0.0, frameon=False)
    return ax


def steps_title(drawn: int, recorded: int) -> str:
    """The legend title of a line-per-step view: how many of the recorded steps it draws."""
    if drawn == recorded:
        return "step (the only one recorded)" if recorded == 1 else f"step (all {recorded} recorded)"
    return f"step ({drawn} of {recorded} recorded)"


def step_axis(steps: Sequence[int]) -> tuple[np.ndarray, str, float]:
    """Cell edges around each of two or more sorted ``steps`` on a true step axis, its scale and the
    symmetric-log linear range (0 unless ``symlog``).

    The scale is logarithmic when the gaps between recorded steps differ more than tenfold (a log-spaced
    schedule): ``log``, or ``symlog`` linear below the first positive step when step 0 was recorded too.
    Each cell reaches halfway to its neighbours in the axis's own coordinates.
    """
    x = np.asarray(steps, dtype=float)
    gaps = np.diff(x[x > 0]) if len(x) > 2 else np.array([1.0])
    spaced = len(gaps) > 1 and x[-1] > 0 and gaps.max() >= 10 * gaps.min()
    scale, linthresh = ("linear", 0.0) if not spaced else (("log", 0.0) if x[0] > 0 else ("symlog", x[1]))
    if scale == "symlog":
        fwd = SymmetricalLogTransform(10, linthresh, 1.0)
        to, back = (lambda v: fwd.transform_non_affine(v)), (lambda v: fwd.inverted().transform_non_affine(v))
    elif scale == "log":
        to, back = np.log10, (lambda v: 10.0 ** v)
    else:
        to, back = (lambda v: v), (lambda v: v)
    t = to(x)
    edges = np.concatenate([[t[0] - (t[1] - t[0]) / 2], (t[1:] + t[:-1]) / 2, [t[-1] + (t[-1] - t[-2]) / 2]])
    return np.asarray(back(edges), dtype=float), scale, float(linthresh)


def variance_heatmap(data: pd.DataFrame, ax: Axes | None = None, *, run: str | None = None,
                     site: str = "resid_post", direction: str = "fwd", stat: str = "var", cmap: str = "magma",
                     vmin: float | None = None, vmax: float | None = None, colorbar: bool = True) -> Axes:
    """Heatmap of ``log10(stat)`` with layers on y (layer 0 at the bottom) and training steps on a true x
    axis: each recorded step's column reaches halfway to its neighbours (:func:`step_axis`), on a log axis
    when the steps are log-spaced, so wide columns are stretches with no recording.

    Non-positive values are left blank. ``vmin``/``vmax`` (in log10 units) fix the colour range, e.g. to
    compare runs. Raises ``MissingDataError`` when the run has no such rows, or rows at one step only (the
    variance figure draws one step).
    """
    check_frame(data)
    run = pick_run(data, run)
    table = mean_by(layer_rows(select(data, stat=stat, site=site, direction=direction, run_id=run)), ["step", "layer"])
    if table.empty:
        raise MissingDataError(f"run {run!r} has no {stat!r} rows at site {site!r}, direction {direction!r}")
    grid = table.pivot(index="layer", columns="step", values="value")
    what = quantity_label(site, direction, stat)
    if grid.shape[1] < 2:
        step = int(grid.columns[0])
        raise OneStepError(f"run {run!r} has {what} at one step only ({step:,}); the heatmap needs two or more "
                           "steps: draw the variance figure (gpas-probe plot variance) for one step",
                           f"one step only ({step:,}):\ndraw the variance figure")
    logged = np.log10(grid.where(grid > 0).to_numpy(dtype=float))
    ax = plt.gca() if ax is None else ax
    edges, scale, linthresh = step_axis([int(s) for s in grid.columns])
    rows = np.arange(grid.shape[0] + 1) - 0.5
    mesh = ax.pcolormesh(edges, rows, np.ma.masked_invalid(logged), cmap=sns.color_palette(cmap, as_cmap=True),
                         vmin=vmin, vmax=vmax)
    if scale == "log":
        log_x(ax)
    elif scale == "symlog":
        ax.set_xscale("symlog", linthresh=linthresh)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    ax.set_xlim(edges[0], edges[-1])
    every = max(1, math.ceil(grid.shape[0] / 12))  # at most ~12 layer labels
    ax.set_yticks(np.arange(grid.shape[0])[::every], [str(layer) for layer in grid.index[::every]])
    ax.set_ylim(rows[0], rows[-1])
    if colorbar:
        ax.figure.colorbar(mesh, ax=ax, label=f"log10 {what}")
    ax.set_xlabel("training step" + ("" if scale == "linear" else " (log scale)"))
    ax.set_ylabel("layer")
    ax.set_title(run)
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
              site: str = "resid_post", last: int = 1, step: int | None = None, legend: bool = True) -> Axes:
    """Gradient (or activation) size by layer, one line per run, log y, averaged over the last ``last`` steps
    or drawn at ``step`` (with a band where the rows carry bounds: a group of seeds,
    :func:`~gpas_probe.table.aggregate_runs`).

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
        if step is not None:
            rows = rows[rows["step"] == int(step)]
            if rows.empty:
                missing.append(run)
                continue
        rows, steps_by_run[run] = _last_steps(rows, last)
        profile = rows.groupby("layer", sort=True)[["value", "lo", "hi"]].mean()
        ax.plot(profile.index.to_numpy(), positive(profile["value"].to_numpy()), color=colors[run], marker="o",
                markersize=3.5, linewidth=1.6, label=run)
        draw_band(ax, profile.index.to_numpy(), profile["lo"], profile["hi"], colors[run])
    what = "parameter gradient norm" if view == "params" else quantity_label(site, direction, stat)
    if not steps_by_run:
        where = "" if step is None else f" at step {step}"
        raise MissingDataError(f"no run has {what} ({stat!r} at {site!r}, {direction!r}){where}; runs: {runs}")
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
