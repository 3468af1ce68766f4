"""Whole figures comparing runs side by side, the ``FIGURES`` registry, and ``save_figure``."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.figure import Figure

from gpas_probe.plots.common import (
    MissingDataError,
    annotate_missing,
    check_frame,
    layer_norm,
    quantity_label,
)
from gpas_probe.plots.depth import grad_norm, shortcut_ratio, variance_growth, variance_heatmap
from gpas_probe.plots.dynamics import gates, loss_curves
from gpas_probe.plots.importance import (
    IMPORTANCE_SITE,
    PROFILE_HINT,
    angular_heatmap,
    colorbar_ticks,
    importance_bars,
    importance_label,
    importance_over_training,
    symlog_norm,
)
from gpas_probe.store.schema import GATE_SITES
from gpas_probe.table import gate_values, layer_rows, mean_by, resolve_runs, select

logger = logging.getLogger(__name__)

MAX_COLUMNS = 3
SAVE_FORMATS = {".png", ".svg", ".pdf"}


def _panels(n: int, *, width: float = 5.2, height: float = 4.2, sharey: bool = False) -> tuple[Figure, list[Axes]]:
    """``n`` panels, at most ``MAX_COLUMNS`` per row; unused grid cells are hidden."""
    ncols = min(n, MAX_COLUMNS)
    nrows = math.ceil(n / ncols)
    fig, grid = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False,
                             sharey=sharey, layout="constrained")
    axes = list(grid.ravel())
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _inner_ylabels_off(axes: list[Axes]) -> None:
    """Shared y axes: keep the y label on the first column only."""
    for ax in axes:
        if not ax.get_subplotspec().is_first_col():
            ax.set_ylabel("")


def _per_run(fig: Figure, axes: list[Axes], runs: list[str], draw: Callable[[Axes, str], object],
             empty_text: Callable[[str], str]) -> None:
    """Draw each run's panel; a run without data gets an annotated panel, and no data at all is an error."""
    errors = []
    for ax, run in zip(axes, runs, strict=True):
        try:
            draw(ax, run)
        except MissingDataError as err:
            errors.append(str(err))
            ax.set_title(run)
            annotate_missing(ax, empty_text(run))
    if len(errors) == len(runs):
        plt.close(fig)
        raise MissingDataError("; ".join(errors))


def _required(sub: pd.DataFrame, runs: list[str], what: str) -> pd.DataFrame:
    if sub.empty:
        raise MissingDataError(f"no run has {what}; runs: {runs}")
    return sub


def variance_figure(data: pd.DataFrame, runs: Iterable[str] | None = None, *, site: str = "resid_post",
                    direction: str = "fwd", stat: str = "var", steps: Iterable[int] | None = None,
                    max_steps: int = 8) -> Figure:
    """One ``variance_growth`` panel per run, shared log y axis."""
    check_frame(data)
    runs = resolve_runs(data, runs)
    sub = _required(layer_rows(select(data, stat=stat, site=site, direction=direction)), runs,
                    f"{stat!r} rows at site {site!r}, direction {direction!r}")
    steps = None if steps is None else list(steps)
    fig, axes = _panels(len(runs), sharey=True)
    what = quantity_label(site, direction, stat)
    _per_run(fig, axes, runs,
             lambda ax, run: variance_growth(sub, ax=ax, run=run, site=site, direction=direction, stat=stat,
                                             steps=steps, max_steps=max_steps),
             lambda run: f"no {what} recorded")
    _inner_ylabels_off(axes)
    fig.suptitle(f"{what} across layers, one line per recorded step")
    return fig


def heatmap_figure(data: pd.DataFrame, runs: Iterable[str] | None = None, *, site: str = "resid_post",
                   direction: str = "fwd", stat: str = "var", cmap: str = "magma") -> Figure:
    """One ``variance_heatmap`` panel per run with one shared colour scale and colorbar."""
    check_frame(data)
    runs = resolve_runs(data, runs)
    sub = _required(layer_rows(select(data, stat=stat, site=site, direction=direction)), runs,
                    f"{stat!r} rows at site {site!r}, direction {direction!r}")
    values = mean_by(sub, ["run_id", "step", "layer"])["value"].to_numpy()
    logged = np.log10(values[values > 0]) if len(values) else np.array([])
    vmin, vmax = (float(logged.min()), float(logged.max())) if len(logged) else (None, None)
    fig, axes = _panels(len(runs), width=5.0, height=4.4)
    what = quantity_label(site, direction, stat)
    _per_run(fig, axes, runs,
             lambda ax, run: variance_heatmap(sub, ax=ax, run=run, site=site, direction=direction, stat=stat,
                                              cmap=cmap, vmin=vmin, vmax=vmax, colorbar=False),
             lambda run: f"no {what} recorded")
    mappable = ScalarMappable(cmap=sns.color_palette(cmap, as_cmap=True), norm=plt.Normalize(vmin, vmax))
    fig.colorbar(mappable, ax=axes, label=f"log10 {what}", shrink=0.9)
    fig.suptitle(f"{what} by layer and training step")
    return fig


def ratio_figure(data: pd.DataFrame, runs: Iterable[str] | None = None, *, step: int | None = None) -> Figure:
    """Shortcut/branch RMS ratio (left, log y) and cosine (right) by layer, runs as colours."""
    check_frame(data)
    runs = resolve_runs(data, runs)
    sub = _required(layer_rows(select(data, site=["attn", "mlp"], direction="fwd")), runs,
                    "'shortcut_branch_ratio' rows at sites 'attn'/'mlp'")
    has_cos = bool((sub["stat"] == "shortcut_branch_cos").any())
    fig, axes = _panels(2 if has_cos else 1, width=6.0, height=4.4)
    try:
        shortcut_ratio(sub, ax=axes[0], runs=runs, step=step)
        if has_cos:
            shortcut_ratio(sub, ax=axes[1], runs=runs, step=step, stat="shortcut_branch_cos")
    except MissingDataError:
        plt.close(fig)
        raise
    fig.suptitle("does the residual shortcut drown the sub-layer output?")
    return fig


def grad_figure(data: pd.DataFrame, runs: Iterable[str] | None = None, *, site: str = "resid_post",
                last: int = 1) -> Figure:
    """Forward view (activation RMS), backward view (gradient RMS) and parameter gradient norm by layer.

    A view that no run recorded is left as an annotated panel; if no view has data, ``MissingDataError``.
    """
    check_frame(data)
    runs = resolve_runs(data, runs)
    sub = _required(layer_rows(select(data, stat=["rms", "grad_norm"], site=[site, "params"])), runs,
                    f"'rms' rows at site {site!r} nor 'grad_norm' rows at site 'params'")
    fig, axes = _panels(3, width=4.8, height=4.2)
    views = ["fwd", "bwd", "params"]
    errors = []
    for ax, view in zip(axes, views, strict=True):
        try:
            grad_norm(sub, ax=ax, view=view, runs=runs, site=site, last=last)
        except MissingDataError as err:
            errors.append(str(err))
            annotate_missing(ax, f"no {view} data recorded")
    if len(errors) == len(views):
        plt.close(fig)
        raise MissingDataError("; ".join(errors))
    fig.suptitle("size by layer: activations (forward) vs gradients (backward)")
    return fig


def gates_figure(data: pd.DataFrame, runs: Iterable[str] | None = None, *, stat: str = "scale",
                 palette: str = "viridis") -> Figure:
    """One ``gates`` panel per run (shared y and one layer colorbar).

    Runs without gates get the text "no GPAS gates in this run", even when no run has gates (a comparison
    of baselines is not an error).
    """
    check_frame(data)
    runs = resolve_runs(data, runs)
    sub = select(data, site=list(GATE_SITES), run_id=runs)
    table = gate_values(sub, stat)
    norm = layer_norm(table["layer"].to_numpy())
    fig, axes = _panels(len(runs), sharey=True)
    gated = set(table["run_id"])
    for ax, run in zip(axes, runs, strict=True):
        gates(sub if not sub.empty else data, ax=ax, run=run, stat=stat, palette=palette, colorbar=False,
              norm=norm)
        if run not in gated and gated:
            ax.set_xlim(table["step"].min(), table["step"].max())  # same step range as the gated panels
    _inner_ylabels_off(axes)
    if not table.empty:
        cmap = sns.color_palette(palette, as_cmap=True)
        fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=axes, label="layer")
    fig.suptitle("GPAS gate trajectories, one line per layer")
    return fig


def loss_figure(data: pd.DataFrame, runs: Iterable[str] | None = None, *, smooth: int | None = None,
                logy: bool = False) -> Figure:
    """All runs' loss curves on one Axes."""
    check_frame(data)
    runs = resolve_runs(data, runs)
    fig, axes = _panels(1, width=7.0, height=4.4)
    try:
        loss_curves(data, ax=axes[0], runs=runs, smooth=smooth, logy=logy)
    except MissingDataError:
        plt.close(fig)
        raise
    return fig


def _profiled(sub: pd.DataFrame, runs: list[str], what: str) -> pd.DataFrame:
    if sub.empty:
        raise MissingDataError(f"no run has {what} (runs: {runs}); {PROFILE_HINT}")
    return sub


def importance_figure(data: pd.DataFrame, runs: Iterable[str] | None = None, *,
                      stats: Iterable[str] = ("deletion_delta", "block_influence"), step: int | None = None) -> Figure:
    """One ``importance_bars`` panel per importance statistic (default deletion cost and block influence),
    every run side by side in each panel. A statistic no run has is left as an annotated panel; if no run
    was profiled, ``MissingDataError`` telling the user to run ``gpas-probe profile``."""
    check_frame(data)
    runs = resolve_runs(data, runs)
    stats = list(stats)
    sub = _profiled(layer_rows(select(data, site=IMPORTANCE_SITE, stat=stats, run_id=runs)), runs,
                    f"layer-importance rows ({', '.join(stats)})")
    present = [s for s in stats if (sub["stat"] == s).any()]
    num_layers = int(sub["layer"].max()) + 1
    width = min(14.0, max(7.0, 0.3 * num_layers * max(1.0, len(runs) / 2) + 2))
    fig, grid = plt.subplots(len(present), 1, figsize=(width, 3.4 * len(present)), squeeze=False, sharex=True,
                             layout="constrained")
    axes = list(grid[:, 0])
    for ax, stat in zip(axes, present, strict=True):
        try:
            importance_bars(sub, ax=ax, stat=stat, runs=runs, step=step, legend=len(runs) > 1)
        except MissingDataError:
            plt.close(fig)
            raise
        ax.set_title(importance_label(stat).split(" (")[0] + f", {ax.get_title()}", fontsize="medium")
        if ax is not axes[-1]:
            ax.set_xlabel("")
    fig.suptitle("which layers matter? (higher = the model needs the layer more)")
    return fig


def angular_figure(data: pd.DataFrame, runs: Iterable[str] | None = None, *, normalized: bool = True,
                   step: int | None = None, cmap: str = "viridis") -> Figure:
    """One ``angular_heatmap`` triangle per run (Mix-LN style) with one shared colour scale and colorbar."""
    check_frame(data)
    runs = resolve_runs(data, runs)
    sub = layer_rows(select(data, stat=["angular_distance", "angular_distance_norm"], run_id=runs))
    sub = _profiled(sub[np.asarray(sub["site"].astype(str).str.startswith("angular_n"), dtype=bool)], runs,
                    "angular-distance rows")
    vmin, vmax = (0.0, 1.0) if normalized else (float(sub["value"].min()), float(sub["value"].max()))
    fig, axes = _panels(len(runs), width=5.0, height=4.4)
    _per_run(fig, axes, runs,
             lambda ax, run: angular_heatmap(sub, ax=ax, run=run, normalized=normalized, step=step, cmap=cmap,
                                             vmin=vmin, vmax=vmax, colorbar=False),
             lambda run: f"no angular distances: {PROFILE_HINT}")
    label = "angular distance, min-max per n" if normalized else "angular distance arccos(cos)/π"
    mappable = ScalarMappable(cmap=sns.color_palette(cmap, as_cmap=True), norm=plt.Normalize(vmin, vmax))
    fig.colorbar(mappable, ax=axes, label=label, shrink=0.9)
    fig.suptitle(r"angular distance between $h_l$ and $h_{l+n}$ (dark: the block changes the stream least)")
    return fig


def importance_steps_figure(data: pd.DataFrame, runs: Iterable[str] | None = None, *,
                            stat: str = "deletion_delta", cmap: str = "viridis", log: bool = True) -> Figure:
    """One ``importance_over_training`` layer × checkpoint-step heatmap per run, one shared colour scale
    (symmetric-log unless ``log=False``)."""
    check_frame(data)
    runs = resolve_runs(data, runs)
    sub = _profiled(layer_rows(select(data, stat=stat, site=IMPORTANCE_SITE, run_id=runs)), runs,
                    f"{stat!r} layer-importance rows")
    values = mean_by(sub, ["run_id", "step", "layer"])["value"].to_numpy()
    vmin, vmax = float(np.nanmin(values)), float(np.nanmax(values))
    norm = symlog_norm(values) if log else plt.Normalize(vmin, vmax)
    fig, axes = _panels(len(runs), width=5.0, height=4.4)
    _per_run(fig, axes, runs,
             lambda ax, run: importance_over_training(sub, ax=ax, run=run, stat=stat, cmap=cmap, vmin=vmin,
                                                      vmax=vmax, log=log, colorbar=False),
             lambda run: f"no layer importance: {PROFILE_HINT}")
    mappable = ScalarMappable(cmap=sns.color_palette(cmap, as_cmap=True), norm=norm)
    fig.colorbar(mappable, ax=axes, label=importance_label(stat) + (", symlog scale" if log else ""), shrink=0.9,
                 **colorbar_ticks(norm))
    fig.suptitle("layer importance over training, one column per profiled checkpoint")
    return fig


FIGURES: dict[str, Callable[..., Figure]] = {
    "variance": variance_figure,
    "heatmap": heatmap_figure,
    "ratio": ratio_figure,
    "grad": grad_figure,
    "gates": gates_figure,
    "loss": loss_figure,
    "importance": importance_figure,
    "angular": angular_figure,
    "importance-steps": importance_steps_figure,
}


def make_figure(kind: str, data: pd.DataFrame, runs: Iterable[str] | None = None, **kwargs: object) -> Figure:
    """The ``FIGURES[kind]`` figure for ``runs`` (default every run in ``data``); ``kwargs`` go to it."""
    if kind not in FIGURES:
        raise ValueError(f"unknown figure kind {kind!r}; choose one of {sorted(FIGURES)}")
    return FIGURES[kind](data, runs, **kwargs)


compare_figure = make_figure


def save_figure(fig: Figure, path: str | Path, *, dpi: int = 150) -> Path:
    """Save ``fig`` as PNG, SVG or PDF according to the suffix of ``path``; parent folders are created."""
    path = Path(path)
    if path.suffix.lower() not in SAVE_FORMATS:
        raise ValueError(f"cannot save a figure as {path.suffix or 'no suffix'!r}; use one of {sorted(SAVE_FORMATS)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight", format=path.suffix.lower()[1:])
    logger.info("saved figure %s", path)
    return path
