"""What whole figures share: the grid of panels, one panel per run, notes under the panels, colour bars
with at least two ticks."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.colorbar import Colorbar
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.layout_engine import ConstrainedLayoutEngine
from matplotlib.ticker import MaxNLocator

from gpas_probe.plots.common import MissingDataError, OneStepError, annotate_missing

MAX_COLUMNS = 3
NOTE_HEIGHT_IN = 0.32  # the strip under the panels that holds a figure's note, in inches


def panels(n: int, *, width: float = 5.2, height: float = 4.2, sharey: bool = False) -> tuple[Figure, list[Axes]]:
    """``n`` panels, at most ``MAX_COLUMNS`` per row; unused grid cells are hidden."""
    ncols = min(n, MAX_COLUMNS)
    nrows = math.ceil(n / ncols)
    fig, grid = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False,
                             sharey=sharey, layout="constrained")
    axes = list(grid.ravel())
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def inner_ylabels_off(axes: Sequence[Axes]) -> None:
    """Shared y axes: keep the y label on the first column only."""
    for ax in axes:
        if not ax.get_subplotspec().is_first_col():
            ax.set_ylabel("")


def per_run(fig: Figure, axes: Sequence[Axes], runs: Sequence[str], draw: Callable[[Axes, str], object],
            empty_text: Callable[[str], str]) -> None:
    """Draw each run's panel; a run without data gets a panel annotated with ``empty_text(run)`` (a run
    recorded at one step only, with its :class:`OneStepError`'s panel text), and no data at all is an
    error (the figure is closed, the runs' errors joined)."""
    errors = []
    for ax, run in zip(axes, runs, strict=True):
        try:
            draw(ax, run)
        except MissingDataError as err:
            errors.append(str(err))
            ax.set_title(run)
            annotate_missing(ax, err.panel if isinstance(err, OneStepError) else empty_text(run))
    if len(errors) == len(runs):
        plt.close(fig)
        raise MissingDataError("; ".join(dict.fromkeys(errors)))


def figure_note(fig: Figure, text: str) -> None:
    """``text`` in a strip under the panels, kept clear of them by the constrained layout."""
    strip = min(0.2, NOTE_HEIGHT_IN / fig.get_figheight())
    engine = fig.get_layout_engine()
    if isinstance(engine, ConstrainedLayoutEngine):
        engine.set(rect=(0.0, strip, 1.0, 1.0 - strip))
    fig.text(0.01, strip / 2, text, ha="left", va="center", fontsize="small", color="0.3")


def spread(vmin: float, vmax: float) -> tuple[float, float]:
    """``(vmin, vmax)`` widened around a single value (one layer, one step, a constant), so that a colour
    scale never has an empty range."""
    if vmax > vmin:
        return vmin, vmax
    pad = abs(vmin) * 0.05 or 0.5
    return vmin - pad, vmax + pad


def at_least_two_ticks(cbar: Colorbar, norm: Normalize) -> None:
    """Give ``cbar`` its two ends as ticks when its locator left it fewer than two (a narrow range of a
    symmetric-log scale would otherwise be labelled by one number)."""
    lo, hi = float(norm.vmin), float(norm.vmax)
    ticks = [t for t in cbar.get_ticks() if lo <= t <= hi]
    if len(ticks) >= 2 or hi <= lo:
        return
    ends = [float(f"{lo:.2g}"), float(f"{hi:.2g}")]
    ends = [min(max(t, lo), hi) for t in ends]
    cbar.set_ticks(sorted(set(ticks) | set(ends)))


def layer_colorbar(fig: Figure, mappable: object, ax: Axes | Sequence[Axes]) -> Colorbar:
    """A colour bar of layer indices: integer ticks, at least two."""
    cbar = fig.colorbar(mappable, ax=ax, label="layer")
    lo, hi = cbar.mappable.norm.vmin, cbar.mappable.norm.vmax
    ticks = MaxNLocator(integer=True, nbins=6).tick_values(lo, hi)
    cbar.set_ticks([t for t in ticks if lo <= t <= hi])
    return cbar


def finite_range(values: np.ndarray) -> tuple[float | None, float | None]:
    """The smallest and largest finite value (None, None when there is none), widened when equal."""
    arr = np.asarray(values, dtype=float)
    arr = arr[np.isfinite(arr)]
    if not len(arr):
        return None, None
    return spread(float(arr.min()), float(arr.max()))
