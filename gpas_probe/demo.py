"""The demo's library side: what it records and which figures it draws (``gpas-probe demo``)."""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from gpas_probe.plots import make_figure, save_figure
from gpas_probe.probes import ProbeConfig

log = logging.getLogger(__name__)

#: Every figure of the demo, in the order they are written.
DEMO_FIGURES = ("variance", "heatmap", "ratio", "grad", "gates", "loss")


def demo_probe_config(every: int = 25) -> ProbeConfig:
    """Every statistic family, on step 1, log-spaced early steps and every ``every`` steps."""
    return ProbeConfig(every=every, schedule="log", per_decade=4)


def render_figures(data: pd.DataFrame, folder: str | Path, kinds: tuple[str, ...] = DEMO_FIGURES,
                   suffix: str = "png") -> list[Path]:
    """Draw each figure kind for every run in ``data`` (side by side) into ``folder``."""
    folder = Path(folder)
    paths = []
    for kind in kinds:
        fig = make_figure(kind, data)
        try:
            paths.append(save_figure(fig, folder / f"{kind}.{suffix}"))
        finally:
            plt.close(fig)
        log.info("wrote %s", paths[-1])
    return paths
