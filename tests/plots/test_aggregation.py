"""The depth-profile figures draw aggregates: the number of points does not grow with the number of recorded
steps (no timings; speed is measured by benchmarks/)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from gpas_probe.plots import make_figure
from gpas_probe.store import COLUMNS


def _table(n_steps: int, layers: int = 6) -> pd.DataFrame:
    rng = np.random.default_rng(n_steps)
    rows = []
    for step in range(1, n_steps + 1):
        for layer in range(layers):
            for _ in range(2):  # every statistic twice (a resumed run loaded with dedupe=False)
                rows += [("r", step, layer, "resid_post", d, stat, float(rng.uniform(0.5, 2.0)))
                         for d in ("fwd", "bwd") for stat in ("var", "rms")]
                rows += [("r", step, layer, sub, "fwd", "shortcut_branch_ratio", float(rng.uniform(1, 9)))
                         for sub in ("attn", "mlp")]
                rows.append(("r", step, layer, "params", "none", "grad_norm", float(rng.uniform(0.1, 1))))
    return pd.DataFrame(rows, columns=list(COLUMNS))


def _points(fig: plt.Figure) -> int:
    return sum(len(line.get_xdata()) for ax in fig.axes for line in ax.get_lines())


@pytest.mark.parametrize("kind", ["variance", "ratio", "grad"])
def test_depth_figures_draw_as_many_points_for_many_steps_as_for_few(kind: str) -> None:
    few, many = make_figure(kind, _table(20)), make_figure(kind, _table(400))
    try:
        assert 0 < _points(few) == _points(many) <= 8 * 6 * 3  # at most 8 steps x 6 layers x 3 panels
    finally:
        plt.close(few)
        plt.close(many)
