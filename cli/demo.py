"""``gpas-probe demo``: the main job. Pre-LN against Pre+GPAS (or another scheme against its GPAS
version) on the built-in corpus, probes on, every figure for both runs side by side."""

from __future__ import annotations

import shutil
from pathlib import Path

import typer

from gpas_probe.cli.analyze import print_compare
from gpas_probe.cli.common import console, friendly_errors, setup_logging
from gpas_probe.cli.train import run_with_progress
from gpas_probe.config import ModelConfig, NormScheme, TrainConfig, get_preset
from gpas_probe.demo import DEMO_FIGURES, demo_probe_config, render_figures
from gpas_probe.store import load_runs


@friendly_errors
def demo_cmd(
    steps: int = typer.Option(300, help="Training steps per run."),
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="Folder for both runs and the figures."),
    norm: NormScheme = typer.Option(NormScheme.PRE, help="The scheme to pit against its GPAS version."),
    preset: str = typer.Option("small", help="Model preset (deep and narrow shows depth effects best)."),
    seed: int = typer.Option(0, help="Seed shared by both runs (same init of shared weights, same batches)."),
    probe_every: int = typer.Option(25, help="Record probes every N steps."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier demo in --out."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Train a scheme with and without GPAS, record probes, draw every figure, compare."""
    setup_logging(verbose)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} already holds a demo; pass --overwrite to replace it or --out elsewhere")
        shutil.rmtree(out)
    p = get_preset(preset)
    tc = TrainConfig(**{**p.train, "steps": steps, "seed": seed, "eval_every": max(1, steps // 6)})
    runs = []
    for gpas in (False, True):
        model = ModelConfig.from_preset(preset, norm=norm, gpas=gpas)
        label = f"{norm.value}{'+gpas' if gpas else ''}"
        run_dir = out / label.replace("+", "-")
        run_with_progress(model, tc, run_dir, label, probe=demo_probe_config(probe_every))
        runs.append(run_dir)
    data = load_runs(runs)
    figures = render_figures(data, out / "figures")
    title = f"{norm.value} vs {norm.value}+GPAS, {preset} preset, {steps} steps"
    print_compare(data, title)
    console.print(f"runs: {', '.join(str(r) for r in runs)}")
    console.print(f"figures ({len(figures)}): {out / 'figures'}/" + "{" + ",".join(DEMO_FIGURES) + "}.png")
