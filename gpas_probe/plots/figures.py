"""Whole figures comparing runs side by side, the ``FIGURES`` registry, ``make_figure`` and ``save_figure``."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.cm import ScalarMappable
from matplotlib.figure import Figure

from gpas_probe.plots.common import (
    MissingDataError,
    annotate_missing,
    check_frame,
    quantity_label,
)
from gpas_probe.plots.depth import grad_norm, shortcut_ratio, variance_growth, variance_heatmap
from gpas_probe.plots.dynamics import gates, loss_curves, loss_differences, smooth_window
from gpas_probe.plots.layout import figure_note, finite_range, inner_ylabels_off, panels, per_run
from gpas_probe.plots.profile_figures import angular_figure, importance_figure, importance_steps_figure
from gpas_probe.plots.selection import check_applies, check_options, keep_layers
from gpas_probe.store.schema import GATE_SITES
from gpas_probe.table import gate_values, layer_rows, mean_by, resolve_runs, select

logger = logging.getLogger(__name__)

SAVE_FORMATS = {".png", ".svg", ".pdf"}


def _required(sub: pd.DataFrame, runs: list[str], what: str) -> pd.DataFrame:
    if sub.empty:
        raise MissingDataError(f"no run has {what}; runs: {runs}")
    return sub


def variance_figure(data: pd.DataFrame, runs: Iterable[str] | None = None, *, site: str = "resid_post",
                    direction: str = "fwd", stat: str = "var", step: int | None = None,
                    steps: Iterable[int] | None = None, max_steps: int = 8) -> Figure:
    """One ``variance_growth`` panel per run, shared log y axis, each with its legend outside on the right
    saying how many of the recorded steps it draws; ``step`` draws that step only."""
    check_frame(data)
    runs = resolve_runs(data, runs)
    sub = _required(layer_rows(select(data, stat=stat, site=site, direction=direction)), runs,
                    f"{stat!r} rows at site {site!r}, direction {direction!r}")
    steps = [step] if step is not None else (None if steps is None else list(steps))
    fig, axes = panels(len(runs), width=6.4, sharey=True)
    what = quantity_label(site, direction, stat)
    per_run(fig, axes, runs,
            lambda ax, run: variance_growth(sub, ax=ax, run=run, site=site, direction=direction, stat=stat,
                                            steps=steps, max_steps=max_steps),
            lambda run: f"no {what} recorded" + ("" if step is None else f" at step {step:,}"))
    inner_ylabels_off(axes)
    fig.suptitle(f"{what} across layers, one line per step")
    return fig


def heatmap_figure(data: pd.DataFrame, runs: Iterable[str] | None = None, *, site: str = "resid_post",
                   direction: str = "fwd", stat: str = "var", cmap: str = "magma") -> Figure:
    """One ``variance_heatmap`` panel per run (a true step axis, log-scaled for log-spaced steps) with one
    shared colour scale and colorbar. A run recorded at one step only gets a panel saying so; when every
    run has one step, ``MissingDataError`` pointing to the variance figure."""
    check_frame(data)
    runs = resolve_runs(data, runs)
    sub = _required(layer_rows(select(data, stat=stat, site=site, direction=direction)), runs,
                    f"{stat!r} rows at site {site!r}, direction {direction!r}")
    values = mean_by(sub, ["run_id", "step", "layer"])["value"].to_numpy()
    vmin, vmax = finite_range(np.log10(values[values > 0]))
    fig, axes = panels(len(runs), width=5.0, height=4.4)
    what = quantity_label(site, direction, stat)
    per_run(fig, axes, runs,
            lambda ax, run: variance_heatmap(sub, ax=ax, run=run, site=site, direction=direction, stat=stat,
                                             cmap=cmap, vmin=vmin, vmax=vmax, colorbar=False),
            lambda run: f"no {what} recorded")
    mappable = ScalarMappable(cmap=sns.color_palette(cmap, as_cmap=True), norm=plt.Normalize(vmin, vmax))
    fig.colorbar(mappable, ax=axes, label=f"log10 {what}", shrink=0.9)
    fig.suptitle(f"{what} by layer and training step")
    return fig


def ratio_figure(data: pd.DataFrame, runs: Iterable[str] | None = None, *, step: int | None = None,
                 site: str | None = None) -> Figure:
    """Shortcut/branch RMS ratio (left, log y) and cosine (right) by layer, runs as colours; ``site``
    (``attn`` or ``mlp``) draws that sub-layer only."""
    check_frame(data)
    runs = resolve_runs(data, runs)
    sites = ["attn", "mlp"] if site is None else [site]
    sub = _required(layer_rows(select(data, site=sites, direction="fwd")), runs,
                    f"'shortcut_branch_ratio' rows at sites {'/'.join(map(repr, sites))}")
    has_cos = bool((sub["stat"] == "shortcut_branch_cos").any())
    fig, axes = panels(2 if has_cos else 1, width=6.0, height=4.4)
    try:
        shortcut_ratio(sub, ax=axes[0], runs=runs, step=step, sites=sites)
        if has_cos:
            shortcut_ratio(sub, ax=axes[1], runs=runs, step=step, sites=sites, stat="shortcut_branch_cos")
    except MissingDataError:
        plt.close(fig)
        raise
    fig.suptitle("does the residual shortcut drown the sub-layer output?")
    return fig


def grad_figure(data: pd.DataFrame, runs: Iterable[str] | None = None, *, site: str = "resid_post",
                last: int = 1, step: int | None = None) -> Figure:
    """Forward view (activation RMS), backward view (gradient RMS) and parameter gradient norm by layer,
    at each run's last step (the mean of the last ``last``) or at ``step``.

    A view that no run recorded is left as an annotated panel; if no view has data, ``MissingDataError``.
    """
    check_frame(data)
    runs = resolve_runs(data, runs)
    sub = _required(layer_rows(select(data, stat=["rms", "grad_norm"], site=[site, "params"])), runs,
                    f"'rms' rows at site {site!r} nor 'grad_norm' rows at site 'params'")
    fig, axes = panels(3, width=4.8, height=4.2)
    views = ["fwd", "bwd", "params"]
    errors = []
    for ax, view in zip(axes, views, strict=True):
        try:
            grad_norm(sub, ax=ax, view=view, runs=runs, site=site, last=last, step=step)
        except MissingDataError as err:
            errors.append(str(err))
            annotate_missing(ax, f"no {view} data recorded" + ("" if step is None else f" at step {step:,}"))
    if len(errors) == len(views):
        plt.close(fig)
        raise MissingDataError("; ".join(errors))
    fig.suptitle("size by layer: activations (forward) vs gradients (backward)")
    return fig


def gates_figure(data: pd.DataFrame, runs: Iterable[str] | None = None, *, stat: str = "scale",
                 palette: str = "viridis") -> Figure:
    """One ``gates`` panel per run with gates (shared y), each with its own layer colour bar, so that a
    4-layer and a 24-layer run both use the whole palette.

    Runs without gates are left out and named in a note under the panels; if no run has gates,
    ``MissingDataError`` ("no GPAS gates in RUN: train with --gpas"), as ``importance`` does for a run that
    was never profiled.
    """
    check_frame(data)
    runs = resolve_runs(data, runs)
    sub = select(data, site=list(GATE_SITES), run_id=runs)
    table = gate_values(sub, stat)
    gated = [r for r in runs if r in set(table["run_id"])]
    if not gated:
        recorded = sorted(set(sub["stat"].astype(str)))
        if recorded:
            raise MissingDataError(f"no {stat!r} gate rows in {', '.join(runs)}; recorded gate stats: "
                                   f"{', '.join(recorded)}")
        raise MissingDataError(f"no GPAS gates in {', '.join(runs)}: train with --gpas")
    fig, axes = panels(len(gated), sharey=True)
    for ax, run in zip(axes, gated, strict=True):
        gates(sub, ax=ax, run=run, stat=stat, palette=palette, colorbar=True)
    inner_ylabels_off(axes)
    left_out = [r for r in runs if r not in gated]
    if left_out:
        figure_note(fig, f"left out, no GPAS gates: {', '.join(left_out)}")
    fig.suptitle("GPAS gate trajectories, one line per layer")
    return fig


def loss_figure(data: pd.DataFrame, runs: Iterable[str] | None = None, *, smooth: int | None = None,
                logy: bool = False) -> Figure:
    """All runs' loss curves on one Axes, raw faint and smoothed solid, and with two or more runs with
    training loss a second panel below: each run's smoothed loss minus the first run's.

    ``smooth`` is the rolling-mean window in recorded points; None chooses it from the longest curve
    (:func:`~gpas_probe.plots.dynamics.smooth_window`), 1 draws the raw curves only.
    """
    check_frame(data)
    runs = resolve_runs(data, runs)
    train = select(data, site="model", stat="loss", run_id=runs)
    counts = train.groupby("run_id", observed=True)["step"].nunique()
    window = smooth_window(int(counts.max()) if len(counts) else 0) if smooth is None else smooth
    with_loss = [r for r in runs if counts.get(r, 0) > 0]
    two = len(with_loss) >= 2
    fig, grid = plt.subplots(2 if two else 1, 1, figsize=(7.0, 6.8 if two else 4.4), sharex=True, squeeze=False,
                             layout="constrained", height_ratios=[2, 1] if two else None)
    axes = list(grid[:, 0])
    try:
        loss_curves(data, ax=axes[0], runs=runs, smooth=window, logy=logy)
        if two:
            loss_differences(data, ax=axes[1], runs=runs, smooth=window)
            axes[0].set_xlabel("")
    except MissingDataError:
        plt.close(fig)
        raise
    return fig


#: The figure kinds, as ``gpas-probe plot KIND`` names them; ``FIGURE_OPTIONS`` the keywords each takes.
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


def make_figure(kind: str, data: pd.DataFrame, runs: Iterable[str] | None = None, *, step: int | None = None,
                site: str | None = None, stat: str | None = None, layers: Iterable[int] | None = None,
                **options: object) -> Figure:
    """The ``FIGURES[kind]`` figure for ``runs`` (default every run in ``data``).

    Selection keywords (the CLI's ``--step``, ``--site``, ``--stat``, ``--layers``); None keeps the
    figure's default, and ``FIGURE_OPTIONS[kind]`` names the ones that apply:

    - ``step``: the step drawn by a figure of one step: ``ratio``, ``grad``, ``importance``, ``angular``
      (default each run's last); for ``variance``, only this step (default up to 8 recorded steps).
    - ``site``: the site of ``variance``, ``heatmap``, ``grad`` (default ``resid_post``) and ``ratio``
      (``attn`` or ``mlp``; default both).
    - ``stat``: ``variance``/``heatmap``: ``var`` (default), ``rms``, ``absmax``, ``var_robust``,
      ``rms_robust``, ``absmax_robust``; ``gates``: ``scale`` (default), ``alpha``, ``silu_alpha``,
      ``alpha_grad``; ``importance``/``importance-steps``: ``deletion_delta``, ``deletion_loss``,
      ``block_influence`` (``importance`` draws deletion cost and block influence by default).
    - ``layers``: layer indices; only their rows are drawn (model-level rows, layer -1, are kept);
      ``angular`` keeps those start layers. Every kind but ``loss``.

    A keyword that does not apply raises ``ValueError("--NAME does not apply to the KIND figure")``; a
    value the selected runs did not record raises ``ValueError`` naming what was recorded (e.g. "step
    99999 was not recorded for the variance figure (var at resid_post); recorded steps: 1..300 (21
    steps)"). Other ``options`` go to the figure function (``direction``, ``smooth``, ``normalized``, ...).
    """
    if kind not in FIGURES:
        raise ValueError(f"unknown figure kind {kind!r}; choose one of {sorted(FIGURES)}")
    check_applies(kind, {"step": step, "site": site, "stat": stat, "layers": layers})
    check_frame(data)
    chosen = resolve_runs(data, runs)
    check_options(kind, data, chosen, step=step, site=site, stat=stat, options=options)
    if layers is not None:
        kept = keep_layers(data, chosen, layers)
        if kind == "angular":
            options["layers"] = sorted(set(kept["layer"][kept["layer"] >= 0].astype(int)))
        else:
            data = kept
    selected = {k: v for k, v in {"step": step, "site": site, "stat": stat}.items() if v is not None}
    return FIGURES[kind](data, runs, **selected, **options)


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
