"""Layer importance views: deletion bars per layer, the angular-distance triangle, importance over training.

They read the rows a profile writes (``gpas_probe.analysis.importance.to_long``): ``site='importance'``
with stats ``deletion_delta``, ``deletion_loss``, ``block_influence``, and ``site=f'angular_n{n}'`` with
``angular_distance`` (and ``angular_distance_norm``). A run without them raises ``MissingDataError``
telling the user to run ``gpas-probe profile`` on it first.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.colors import Normalize, SymLogNorm
from matplotlib.patches import Rectangle
from matplotlib.ticker import FuncFormatter, MaxNLocator

from gpas_probe.plots.common import (
    MissingDataError,
    OneStepError,
    check_frame,
    pick_run,
    run_colors,
    with_bounds,
)
from gpas_probe.table import layer_rows, mean_by, run_list, select

logger = logging.getLogger(__name__)

IMPORTANCE_SITE = "importance"
IMPORTANCE_STATS = ("deletion_delta", "deletion_loss", "block_influence")
ANGULAR_PREFIX = "angular_n"
PROFILE_HINT = "run `gpas-probe profile` first"
MIN_ROW_CELLS = 3  # the scaled angular view hatches the rows with fewer cells
ANGULAR_SCALED = "angular distance, min-max scaled within each n"
ANGULAR_RAW = "angular distance arccos(cos)/π"
IMPORTANCE_NAMES = {
    "deletion_delta": "loss increase when deleted (nats/token)",
    "deletion_loss": "loss with the layer deleted (nats/token)",
    "block_influence": "block influence 1 − cos(input, output)",
}


def importance_label(stat: str) -> str:
    return IMPORTANCE_NAMES.get(stat, stat)


def missing_importance(run: str, what: str) -> MissingDataError:
    """The error for a run without layer-importance rows."""
    return MissingDataError(f"run {run!r} has no {what}; run `gpas-probe profile` on it first")


def _check_stat(stat: str) -> None:
    if stat not in IMPORTANCE_STATS:
        raise ValueError(f"stat must be one of {list(IMPORTANCE_STATS)}, got {stat!r}")


def _at_step(rows: pd.DataFrame, step: int | None) -> tuple[pd.DataFrame, int | None]:
    """The rows of ``step`` (default the last step present), and that step (None when empty)."""
    if rows.empty:
        return rows, None
    chosen = int(rows["step"].max()) if step is None else int(step)
    return rows[rows["step"].to_numpy() == chosen], chosen


def importance_bars(data: pd.DataFrame, ax: Axes | None = None, *, stat: str = "deletion_delta",
                    runs: Iterable[str] | None = None, step: int | None = None, legend: bool = True) -> Axes:
    """Layer importance ``stat`` as bars per layer, the runs side by side in each layer's slot (colour), with
    error bars for its 95% interval over evaluation sequences where the profile recorded one.

    Drawn at each run's last profiled step, or at ``step``. Runs without the rows are named in a note;
    if no run has them, ``MissingDataError``.
    """
    _check_stat(stat)
    check_frame(data)
    runs = run_list(data, runs)
    table = with_bounds(data, stat, ["run_id", "step", "layer"], site=IMPORTANCE_SITE, run_id=runs)
    ax = plt.gca() if ax is None else ax
    colors = run_colors(runs)
    drawn: dict[str, pd.DataFrame] = {}
    steps: dict[str, int] = {}
    for run in runs:
        rows, chosen = _at_step(table[table["run_id"] == run], step)
        if not rows.empty:
            drawn[run], steps[run] = rows, int(chosen)  # type: ignore[arg-type]
    if not drawn:
        where = "" if step is None else f" at step {step}"
        raise MissingDataError(f"no run has {stat!r} layer-importance rows{where} (runs: {runs}); {PROFILE_HINT}")
    width = 0.8 / len(drawn)
    for i, (run, rows) in enumerate(drawn.items()):
        offset = (i - (len(drawn) - 1) / 2) * width
        x, y = rows["layer"].to_numpy() + offset, rows["value"].to_numpy()
        ax.bar(x, y, width=width * 0.95, color=colors[run], label=run, edgecolor="none")
        if rows["lo"].notna().any():
            err = np.stack([y - rows["lo"].to_numpy(), rows["hi"].to_numpy() - y])
            ax.errorbar(x, y, yerr=err, fmt="none", ecolor="0.15", elinewidth=0.9, capsize=2, label="_95% interval")
    ax.axhline(0.0, color="0.3", linewidth=0.8)
    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(importance_label(stat))
    spans = set(steps.values())
    at = f"step {spans.pop():,}" if len(spans) == 1 else "each run's last profiled step"
    ax.set_title(f"layer importance at {at}")
    ax.grid(True, axis="y", alpha=0.3)
    missing = [r for r in runs if r not in drawn]
    if missing:
        ax.text(0.01, 0.01, f"not profiled: {', '.join(missing)}", transform=ax.transAxes, ha="left", va="bottom",
                fontsize="small", color="0.35")
    if legend:
        ax.legend(title="run", fontsize="small", title_fontsize="small", loc="best", framealpha=0.8)
    return ax


def angular_table(data: pd.DataFrame, run: str, *, normalized: bool = True, step: int | None = None) -> pd.DataFrame:
    """The Mix-LN triangle of one run: rows ``n`` (block size 1..L), columns ``layer`` (start 0..L-1).

    Cell ``(n, l)`` is the angular distance between ``h_l`` and ``h_{l+n}``; NaN where ``l + n > L``.
    ``normalized`` uses ``angular_distance_norm`` when recorded, else min-max scales each row of the raw
    distances across ``l`` (a constant row becomes 0), as ``normalize_rows`` does in the analysis.
    """
    rows = layer_rows(select(data, run_id=run, stat=["angular_distance", "angular_distance_norm"]))
    rows = rows[np.asarray(rows["site"].astype(str).str.startswith(ANGULAR_PREFIX), dtype=bool)]
    table = mean_by(rows, ["step", "site", "stat", "layer"])
    table, chosen = _at_step(table, step)
    if table.empty:
        where = "" if step is None else f" at step {step}"
        raise missing_importance(run, f"angular-distance rows{where}")
    table = table.assign(n=table["site"].str.slice(len(ANGULAR_PREFIX)).astype(int))
    raw = table[table["stat"] == "angular_distance"]
    norm = table[table["stat"] == "angular_distance_norm"]
    if normalized and norm.empty:
        lo = raw.groupby("n")["value"].transform("min")
        hi = raw.groupby("n")["value"].transform("max")
        span = (hi - lo).to_numpy()
        value = np.where(span > 0, (raw["value"] - lo).to_numpy() / np.where(span > 0, span, 1.0), 0.0)
        norm = raw.assign(value=value)
    use = norm if normalized else raw
    if use.empty:
        raise missing_importance(run, "raw 'angular_distance' rows")
    num_layers = int(max(use["layer"].max() + 1, use["n"].max()))
    grid = use.pivot(index="n", columns="layer", values="value")
    grid = grid.reindex(index=range(1, num_layers + 1), columns=range(num_layers))
    beyond = np.add.outer(grid.index.to_numpy(), grid.columns.to_numpy()) > num_layers
    grid = grid.mask(beyond)
    grid.attrs["step"] = chosen
    return grid


def _thin(count: int, most: int = 12) -> int:
    return max(1, math.ceil(count / most))


def short_rows(grid: pd.DataFrame) -> list[int]:
    """The block sizes ``n`` of an angular triangle whose row holds fewer than ``MIN_ROW_CELLS`` start
    layers (``L - n + 1`` of them): min-max scaling a row of one or two values can only give 0 and 1."""
    num_layers = grid.shape[1]
    return [int(n) for n in grid.index if num_layers - int(n) + 1 < MIN_ROW_CELLS]


def _hatch(ax: Axes, grid: pd.DataFrame, rows: list[int], columns: list[int], num_layers: int) -> None:
    """Hatch the cells of ``rows`` that exist (``l + n <= L``) in a heatmap drawn from ``grid``."""
    for n in rows:
        i = list(grid.index).index(n)
        for j, layer in enumerate(columns):
            if layer + n <= num_layers:
                ax.add_patch(Rectangle((j, i), 1, 1, fill=False, hatch="///", edgecolor="0.55", linewidth=0,
                                       label="_short row"))


def angular_heatmap(data: pd.DataFrame, ax: Axes | None = None, *, run: str | None = None, normalized: bool = True,
                    step: int | None = None, layers: Iterable[int] | None = None, cmap: str = "viridis",
                    vmin: float | None = None, vmax: float | None = None, colorbar: bool = True) -> Axes:
    """Mix-LN-style heatmap: x the start layer ``l``, y the block size ``n`` (1 at the bottom), colour the
    angular distance ``arccos(cos(h_l, h_{l+n}))/π`` (min-max scaled within each ``n`` by default);
    blank where ``l + n > L``. ``layers`` keeps only those start layers (the scaling still uses every one).

    In the scaled view the rows with fewer than ``MIN_ROW_CELLS`` cells (the largest ``n``) are hatched
    instead of coloured, with a note: scaling one or two values gives only 0 and 1. Dark cells are blocks
    that barely turn the residual stream: candidates for pruning. Raises ``MissingDataError`` when the
    run has no angular rows.
    """
    check_frame(data)
    run = pick_run(data, run)
    grid = angular_table(data, run, normalized=normalized, step=step)
    num_layers, chosen_step = grid.shape[1], grid.attrs["step"]
    hatched = short_rows(grid) if normalized else []
    if hatched:
        grid = grid.astype(float)
        grid.loc[hatched] = np.nan
    columns = list(grid.columns) if layers is None else [c for c in grid.columns if c in set(layers)]
    grid = grid[columns]
    ax = plt.gca() if ax is None else ax
    if normalized:
        vmin, vmax = (0.0 if vmin is None else vmin), (1.0 if vmax is None else vmax)
    label = ANGULAR_SCALED if normalized else ANGULAR_RAW
    sns.heatmap(grid, ax=ax, cmap=cmap, vmin=vmin, vmax=vmax, cbar=colorbar, square=False,
                xticklabels=_thin(grid.shape[1]), yticklabels=_thin(grid.shape[0]),
                cbar_kws={"label": label} if colorbar else None)
    if hatched:
        _hatch(ax, grid, hatched, columns, num_layers)
        ax.text(0.98, 0.98, f"hatched: n with fewer than {MIN_ROW_CELLS} start layers\n(scaling 1–2 values says "
                "nothing)", transform=ax.transAxes, ha="right", va="top", fontsize="x-small", color="0.3")
    ax.invert_yaxis()
    ax.set_xlabel("start layer l")
    ax.set_ylabel("block size n (layers)")
    ax.set_title(f"{run} (step {chosen_step:,})")
    ax.tick_params(axis="x", labelrotation=0)
    ax.tick_params(axis="y", labelrotation=0)
    return ax


def importance_steps_table(data: pd.DataFrame, run: str, stat: str = "deletion_delta") -> pd.DataFrame:
    """``stat`` of one run with layers as rows and profiled steps as columns."""
    _check_stat(stat)
    table = mean_by(layer_rows(select(data, stat=stat, site=IMPORTANCE_SITE, run_id=run)), ["step", "layer"])
    if table.empty:
        raise missing_importance(run, f"{stat!r} layer-importance rows")
    return table.pivot(index="layer", columns="step", values="value")


def symlog_norm(values: np.ndarray | pd.DataFrame, vmin: float | None = None, vmax: float | None = None) -> Normalize:
    """A symmetric-log colour scale for importance values: linear within 1% of the largest magnitude, log
    beyond, so that a few dominant layers (often layer 0) do not flatten the rest; negatives stay visible."""
    arr = np.asarray(values, dtype=float)
    arr = arr[np.isfinite(arr)]
    lo = float(arr.min()) if vmin is None and len(arr) else (vmin if vmin is not None else 0.0)
    hi = float(arr.max()) if vmax is None and len(arr) else (vmax if vmax is not None else 1.0)
    top = max(abs(lo), abs(hi), 1e-12)
    return SymLogNorm(linthresh=0.01 * top, vmin=lo, vmax=hi if hi > lo else lo + 1e-12, base=10)


def colorbar_ticks(norm: Normalize) -> dict[str, object]:
    """Colorbar keywords: for a :class:`SymLogNorm`, 0 and the powers of ten outside its linear range
    (matplotlib's default also ticks inside it, where labels collide), written as plain numbers; a range
    holding fewer than two of them gets its two ends instead, so the bar never has a single tick."""
    if not isinstance(norm, SymLogNorm):
        return {}
    lo, hi, lin = float(norm.vmin), float(norm.vmax), float(norm.linthresh)
    exps = range(math.ceil(math.log10(lin)), math.floor(math.log10(max(abs(lo), abs(hi)))) + 1)
    ticks = [0.0] if lo <= 0 <= hi else []
    ticks += [sign * 10.0 ** e for e in exps for sign in (1, -1) if lo <= sign * 10.0 ** e <= hi]
    if len(ticks) < 2:  # a narrow range: its ends, rounded inwards to two significant digits
        ticks += [_round_within(lo, lo, hi), _round_within(hi, lo, hi)]
    return {"ticks": sorted(set(ticks)), "format": FuncFormatter(lambda x, _: f"{x:.3g}")}


def _round_within(x: float, lo: float, hi: float) -> float:
    """``x`` to two significant digits, or ``x`` itself when rounding would leave ``[lo, hi]``."""
    r = float(f"{x:.2g}")
    return r if lo <= r <= hi else x


def importance_over_training(data: pd.DataFrame, ax: Axes | None = None, *, run: str | None = None,
                             stat: str = "deletion_delta", cmap: str = "viridis", vmin: float | None = None,
                             vmax: float | None = None, log: bool = True, colorbar: bool = True,
                             annotate: bool | None = None) -> Axes:
    """Heatmap of ``stat`` with layers on y (layer 0 at the bottom) and profiled checkpoint steps on x.

    ``log`` uses :func:`symlog_norm` (linear near 0, logarithmic beyond 1% of the largest magnitude), since
    layer 0 often dwarfs the rest; ``log=False`` a linear scale. ``annotate`` writes each cell's value
    (default: when there are at most 120 cells). Raises ``MissingDataError`` when the run has no such rows,
    or rows of one profiled step only (the importance bars draw one step).
    """
    check_frame(data)
    run = pick_run(data, run)
    grid = importance_steps_table(data, run, stat)
    if grid.shape[1] < 2:
        step = int(grid.columns[0])
        raise OneStepError(f"run {run!r} was profiled at one step only ({step:,}); importance over training needs "
                           "two or more: draw the importance figure (gpas-probe plot importance) for one step",
                           f"profiled at one step only ({step:,}):\ndraw the importance figure")
    ax = plt.gca() if ax is None else ax
    annotate = grid.size <= 120 if annotate is None else annotate
    norm = symlog_norm(grid.to_numpy(), vmin, vmax) if log else Normalize(vmin, vmax)
    sns.heatmap(grid, ax=ax, cmap=cmap, norm=norm,
                cbar=colorbar, annot=annotate, fmt=".2g",
                annot_kws={"fontsize": "x-small"}, xticklabels=_thin(grid.shape[1]), yticklabels=_thin(grid.shape[0]),
                cbar_kws={"label": importance_label(stat), **colorbar_ticks(norm)} if colorbar else None)
    ax.invert_yaxis()
    ax.set_xlabel("checkpoint step")
    ax.set_ylabel("layer")
    ax.set_title(run)
    ax.tick_params(axis="x", labelrotation=45 if grid.shape[1] > 6 else 0)
    ax.tick_params(axis="y", labelrotation=0)
    return ax


__all__ = ["IMPORTANCE_STATS", "MIN_ROW_CELLS", "angular_heatmap", "angular_table", "importance_bars",
           "importance_over_training", "importance_steps_table", "colorbar_ticks", "short_rows", "symlog_norm"]
