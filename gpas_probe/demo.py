"""The demo's library side (``gpas-probe demo``): the two runs it trains, what it records, and the
figures it draws."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from gpas_probe.config import ModelConfig, NormScheme, TrainConfig, parse_choice
from gpas_probe.plots import make_figure, save_figure
from gpas_probe.probes import ProbeConfig

log = logging.getLogger(__name__)

#: Every figure of the demo, in the order they are written.
DEMO_FIGURES = ("variance", "heatmap", "ratio", "grad", "gates", "loss")


@dataclass(frozen=True)
class DemoRun:
    """One run of the demo: its label (``pre+gpas``), its folder under the demo's and its configs."""

    label: str
    folder: str
    model: ModelConfig
    train: TrainConfig


def demo_runs(preset: str = "small", norm: NormScheme | str = NormScheme.PRE, steps: int = 300,
              seed: int = 0) -> list[DemoRun]:
    """A scheme without and with GPAS, from the same seed on the same batches; validation six times, a
    checkpoint kept at each third of the run (so that a profile shows importance over training)."""
    norm = parse_choice(norm, NormScheme, "scheme")
    train = TrainConfig.from_preset(preset, steps=steps, seed=seed, eval_every=max(1, steps // 6),
                                  checkpoint_every=max(1, steps // 3))  # 3 checkpoints: importance over training
    runs = []
    for gpas in (False, True):
        label = f"{norm.value}{'+gpas' if gpas else ''}"
        runs.append(DemoRun(label, label.replace("+", "-"), ModelConfig.from_preset(preset, norm=norm, gpas=gpas),
                            train))
    return runs


def prepare_demo_dir(out: Path, overwrite: bool) -> None:
    """Refuse an ``out`` that holds an earlier demo unless ``overwrite`` (then it is removed)."""
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} already holds a demo; pass --overwrite to replace it or --out elsewhere")
        shutil.rmtree(out)


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
