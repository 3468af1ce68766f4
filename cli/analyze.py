"""``gpas-probe plot``, ``info`` and ``compare``: read runs' parquet, draw, summarise."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from gpas_probe.cli.common import console, friendly_errors, print_wide, read_resolved, resolve_runs, rich_table

plot_app = typer.Typer(help="Render a figure from one or more runs (side by side).", no_args_is_help=True)

#: The figures ``plot`` draws (the keys of :data:`gpas_probe.plots.FIGURES`, tested equal: the plotting
#: modules import matplotlib, which only a command that draws needs).
FIGURE_HELP = {
    "variance": "Residual-stream variance across layers, one line per recorded step (log scale).",
    "heatmap": "Layer x step heatmap of log10 variance (a log step axis when early steps are log-spaced).",
    "ratio": "Shortcut/branch RMS ratio by layer at the last step (or --step).",
    "grad": "Gradient norms by layer: forward (activation) and backward (gradient) views.",
    "gates": "GPAS gate scale 1 - SiLU(alpha) over training, one line per layer (runs without gates are left "
             "out; none with gates is an error).",
    "loss": "Training and validation loss, raw and smoothed; with several runs, each one's difference from the "
            "first.",
    "importance": "Layer importance (deletion cost, block influence) as bars per layer, runs side by side.",
    "angular": "Angular distance between h_l and h_(l+n) as the Mix-LN triangle heatmap, one per run.",
    "importance-steps": "Deletion cost by layer and profiled checkpoint step, one heatmap per run (two or more "
                        "profiled checkpoints: train with --checkpoint-every).",
}


def parse_layers(text: str) -> list[int]:
    """``0-3,8,10`` -> [0, 1, 2, 3, 8, 10]."""
    layers: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        lo, dash, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi if dash else lo)
        except ValueError:
            raise ValueError(f"--layers must be layer numbers and ranges such as 0-3,8, got {text!r}") from None
        if first < 0 or last < first:
            raise ValueError(f"--layers must be layer numbers and ranges such as 0-3,8, got {text!r}")
        layers.extend(range(first, last + 1))
    if not layers:
        raise ValueError(f"--layers must name at least one layer, got {text!r}")
    return sorted(set(layers))


def default_output(kind: str, runs: list[Path]) -> Path:
    """Where a figure goes without ``-o``: ``RUN/figures/KIND.png`` for one run; for several, the
    ``figures/`` folder of the folder that holds them all (the current one when they share none)."""
    if len(runs) == 1:
        return runs[0] / "figures" / f"{kind}.png"
    parents = {r.parent for r in runs}
    return (parents.pop() if len(parents) == 1 else Path(".")) / "figures" / f"{kind}.png"


def _plot_command(kind: str):
    @friendly_errors
    def command(
        runs: Annotated[list[Path], typer.Argument(help="Run folders (or their probes/ folders), or an output "
                                                        "folder holding one run.")],
        output: Annotated[Path | None, typer.Option("--output", "-o", help="Figure file: .png, .svg or .pdf "
                                                    "(default: RUN/figures/KIND.png; for several runs, "
                                                    "figures/KIND.png beside them).")] = None,
        step: Annotated[int | None, typer.Option(help="The recorded step to draw (figures of one step; variance: "
                                                      "only this step).")] = None,
        site: Annotated[str | None, typer.Option(help="The site to draw (variance, heatmap, grad), e.g. "
                                                      "resid_post, resid_mid, attn_out.")] = None,
        stat: Annotated[str | None, typer.Option(help="The statistic to draw, e.g. var, rms, var_robust "
                                                      "(variance, heatmap), scale, alpha (gates), "
                                                      "deletion_delta, block_influence (importance).")] = None,
        layers: Annotated[str | None, typer.Option(help="Layers to draw, e.g. 0-3,8 (default: all).")] = None,
        each_run: Annotated[bool, typer.Option("--each-run", help="Draw every run, even the seeds of one "
                                                                  "configuration (default: their mean with a "
                                                                  "95% band across seeds).")] = False,
    ) -> None:
        import matplotlib.pyplot as plt

        from gpas_probe.analysis.seeds import grouped, run_groups
        from gpas_probe.plots import make_figure, save_figure
        from gpas_probe.table import aggregate_runs

        folders, labels = resolve_runs(runs)
        options = {"step": step, "site": site, "stat": stat,
                   "layers": parse_layers(layers) if layers is not None else None}
        data = read_resolved(folders, labels)
        groups, _ = run_groups(folders, labels)
        if grouped(groups) and not each_run:
            data = aggregate_runs(data, groups)
        fig = make_figure(kind, data, **{k: v for k, v in options.items() if v is not None})
        target = output if output is not None else default_output(kind, folders)
        try:
            save_figure(fig, target)
        finally:
            plt.close(fig)
        console.print(f"wrote {target}", highlight=False, soft_wrap=True)

    command.__doc__ = FIGURE_HELP[kind]
    return command


for _kind in FIGURE_HELP:
    plot_app.command(_kind)(_plot_command(_kind))


@friendly_errors
def info_cmd(run: Annotated[Path, typer.Argument(help="A run folder, or an output folder holding one run.")]
             ) -> None:
    """Steps, layers, sites, statistics and size of a recorded run, and whether it is still running."""
    from gpas_probe.folders import run_folders, run_state
    from gpas_probe.store import run_info

    (run,) = run_folders([run])
    info = run_info(run)
    for key, value in {**info, "status": run_state(run)}.items():
        console.print(f"[bold]{key}[/]: {value}", highlight=False, soft_wrap=True)


def print_comparison(data, groups: dict[str, str] | None = None, seeds: dict[str, int | None] | None = None,
                     title: str | None = None) -> None:
    """The comparison table (configurations as means over their seeds when ``groups`` groups runs) and the
    lines under it: its legend, and each configuration's paired difference from the first."""
    from gpas_probe.report.content import comparison

    table, lines = comparison(data, groups or {}, seeds or {})
    if title is not None:
        table.title = title
    print_wide(rich_table(table))
    legend, *differences = lines
    console.print(Text(legend, style="dim"))
    for line in differences:
        console.print(Text(line), soft_wrap=not console.is_terminal)


@friendly_errors
def compare_cmd(runs: Annotated[list[Path], typer.Argument(help="Run folders, or an output folder holding one "
                                                                "run.")]) -> None:
    """A table: final validation loss, top/bottom-layer variance ratio, deep shortcut/branch ratio, gates.

    Runs of one configuration with different seeds (train --seeds) are grouped: mean ± a 95% interval
    across seeds, and each configuration's paired difference of final validation loss from the first."""
    from gpas_probe.analysis.seeds import run_groups

    folders, labels = resolve_runs(runs)
    data = read_resolved(folders, labels)
    groups, seeds = run_groups(folders, labels)
    print_comparison(data, groups, seeds)
