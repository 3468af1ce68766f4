"""``gpas-probe demo``: the main job. Pre-LN against Pre+GPAS (or another scheme against its GPAS
version) on the built-in corpus, probes on, every figure for both runs side by side."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from gpas_probe.cli.analyze import print_comparison
from gpas_probe.cli.common import console, friendly_errors, print_next, setup_logging
from gpas_probe.config import NormScheme

Opt = typer.Option


@friendly_errors
def demo_cmd(
    steps: Annotated[int, Opt(help="Training steps per run.")] = 300,
    out: Annotated[Path, Opt("--out", "-o", help="Folder for both runs and the figures.")] = Path("runs/demo"),
    norm: Annotated[str, Opt(help="The scheme to pit against its GPAS version: "
                                  + ", ".join(m.value for m in NormScheme) + ".")] = "pre",
    preset: Annotated[str, Opt(help="Model preset (deep and narrow shows depth effects best).")] = "small",
    seed: Annotated[int, Opt(help="Seed shared by both runs (same init of shared weights, same batches).")] = 0,
    probe_every: Annotated[int, Opt(help="Record probes every N steps.")] = 25,
    overwrite: Annotated[bool, Opt("--overwrite", help="Replace an earlier demo in --out.")] = False,
    threads: Annotated[int, Opt(help="CPU threads (0: as many as cores are free, re-checked during the run).")] = 0,
    verbose: Annotated[bool, Opt("--verbose", "-v", help="Log progress details.")] = False,
) -> None:
    """Train a scheme with and without GPAS, record probes, draw every figure, compare."""
    from gpas_probe.demo import DEMO_FIGURES, demo_probe_config, demo_runs, prepare_demo_dir, render_figures
    from gpas_probe.store import load_runs
    from gpas_probe.training import train  # here: commands that only read runs never import torch

    setup_logging(verbose)
    runs = demo_runs(preset, norm, steps, seed)
    prepare_demo_dir(out, overwrite)
    folders = []
    for run in runs:
        folder = out / run.folder
        train(run.model, replace(run.train, threads=threads), folder, probe=demo_probe_config(probe_every),
              label=run.label)
        folders.append(folder)
    data = load_runs(folders)
    figures = render_figures(data, out / "figures")
    print_comparison(data, title=f"{runs[0].label} vs {runs[1].label}, {preset} preset, {steps} steps")
    console.print(f"runs: {', '.join(str(r) for r in folders)}")
    console.print(f"figures ({len(figures)}): {out / 'figures'}/" + "{" + ",".join(DEMO_FIGURES) + "}.png")
    profiles = out / "profiles"
    print_next(["profile", *folders, "--out", profiles],
               ["diagnose", *(profiles / f.name for f in folders)],
               ["plot", "importance", *(profiles / f.name for f in folders), "-o", out / "figures" / "importance.png"])
