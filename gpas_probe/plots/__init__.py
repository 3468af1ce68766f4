"""Figures from the long probe table (columns run_id, step, layer, site, direction, stat, value).

Axes-level functions follow seaborn: the DataFrame first, column choices as keywords, ``ax=`` in (default
the current Axes), the Axes out. Per-run views (``variance_growth``, ``variance_heatmap``, ``gates``) take
``run=`` (optional when the table holds one run); comparison views (``shortcut_ratio``, ``grad_norm``,
``loss_curves``, ``loss_differences``) draw every run (or ``runs=``) as a colour on one Axes.
``make_figure(kind, data, runs, *, step, site, stat, layers)`` builds a whole Figure for one or more runs
side by side; ``FIGURES`` names the kinds for the CLI and ``FIGURE_OPTIONS`` the selection keywords each
kind takes (a keyword that does not apply, or a value that was not recorded, is a one-line ``ValueError``).

Missing data: an axes-level function raises ``MissingDataError`` (a ``ValueError``) naming the run, site,
direction and stat it could not find, except that ``gates`` writes "no GPAS gates in this run" in the
Axes (a run without gates is normal). Comparison views name the runs without data in a note as long as
one run has data. Figure-level functions give a run without data an annotated empty panel and raise
``MissingDataError`` only when no run has the data; the ``gates`` figure leaves runs without gates out
(named in a note) and raises "no GPAS gates in RUN: train with --gpas" when no run has any. Views over
steps (the heatmaps) need two or more steps: a run with one gets a panel naming the figure to draw instead.

Layer importance (rows written by ``gpas-probe profile``): ``importance_bars`` (bars per layer, runs side by
side), ``angular_heatmap`` (the Mix-LN triangle, ``run=``) and ``importance_over_training`` (layer ×
checkpoint step, ``run=``); a run never profiled raises ``MissingDataError`` saying to run the profile first.

Large tables: every function filters one column at a time and averages duplicates with a groupby
before drawing, so matplotlib only ever sees a few hundred points per line. Nothing here changes global
matplotlib or seaborn state (no style, theme or rcParams changes); the caller closes the figures.
"""

from gpas_probe.plots.common import MissingDataError
from gpas_probe.plots.depth import grad_norm, shortcut_ratio, variance_growth, variance_heatmap
from gpas_probe.plots.dynamics import gates, loss_curves, loss_differences
from gpas_probe.plots.figures import FIGURES, compare_figure, make_figure, save_figure
from gpas_probe.plots.importance import angular_heatmap, importance_bars, importance_over_training
from gpas_probe.plots.selection import FIGURE_OPTIONS

__all__ = ["FIGURES", "FIGURE_OPTIONS", "MissingDataError", "angular_heatmap", "compare_figure", "gates", "grad_norm",
           "importance_bars", "importance_over_training", "loss_curves", "loss_differences", "make_figure",
           "save_figure", "shortcut_ratio", "variance_growth", "variance_heatmap"]
