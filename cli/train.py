"""``gpas-probe train`` (one process, or data-parallel under ``torchrun`` with ``--dist ddp|fsdp``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from gpas_probe.cli.common import console, friendly_errors, progress_bar, reported_by_rank0, setup_logging
from gpas_probe.config import ModelConfig, NormScheme, TrainConfig
from gpas_probe.distributed import DistContext, check_launch, distributed
from gpas_probe.launch import TrainOptions, parse_seeds, run_label, seed_runs
from gpas_probe.probes import FAMILIES
from gpas_probe.training import StepInfo, TrainResult, train

Opt = typer.Option


def run_with_progress(model: ModelConfig, tc: TrainConfig, out: Path, label: str, *,
                      show: bool = True, **kw) -> TrainResult:
    """:func:`train` with a progress bar (none when not ``show``: the other ranks of a torchrun launch)."""
    if not show:
        return train(model, tc, out, **kw)
    with progress_bar(label, tc.steps, "loss {task.fields[loss]} | {task.fields[tps]} tok/s", lazy=True,
                      loss="-", tps="-") as (bar, task):

        def on_step(info: StepInfo) -> None:
            bar.update(task, completed=info.step, loss=f"{info.loss:.3f}", tps=f"{info.tokens_per_s:,.0f}")

        return train(model, tc, out, callback=on_step, **kw)


@friendly_errors
def train_cmd(
    preset: Annotated[str, Opt(help="Model/training preset: tiny, small, medium, 71m ... 7b.")] = "small",
    norm: Annotated[str, Opt(help="Normalization scheme: " + ", ".join(m.value for m in NormScheme) + ".")] = "pre",
    gpas: Annotated[bool, Opt("--gpas/--no-gpas", help="Add GPAS gates.")] = False,
    steps: Annotated[int | None, Opt(help="Optimizer steps (default: the preset's).")] = None,
    lr: Annotated[float | None, Opt(help="Peak learning rate.")] = None,
    warmup: Annotated[int | None, Opt(help="Linear warmup steps.")] = None,
    batch_size: Annotated[int | None, Opt(help="Sequences per step.")] = None,
    seq_len: Annotated[int | None, Opt(help="Tokens per sequence.")] = None,
    seed: Annotated[int | None, Opt(help="Seed for init and batches.")] = None,
    seeds: Annotated[str | None, Opt(help="Several seeds, one run each (e.g. 0,1,2): into OUT-seed0, OUT-seed1, "
                                          "...; compare and plot group them.")] = None,
    data: Annotated[str | None, Opt(help="'builtin' (Python's stdlib source), a text file, or .npy/.bin tokens.")
                    ] = None,
    out: Annotated[Path | None, Opt("--out", "-o", help="Run directory (default runs/PRESET-NORM[-gpas]).")] = None,
    checkpoint_every: Annotated[int | None, Opt(help="Checkpoint every N steps (0 = only at the end).")] = None,
    eval_every: Annotated[int | None, Opt(help="Validation every N steps (0 = only at the end).")] = None,
    grad_clip: Annotated[float | None, Opt(help="Global gradient-norm clip (0 = off).")] = None,
    clip_gate_grad: Annotated[float | None, Opt(help="Joint GPAS gate-gradient clip (0 = off).")] = None,
    gate: Annotated[str, Opt(help="One GPAS gate per layer, or per sub-layer: layer, sublayer.")] = "layer",
    naive: Annotated[bool, Opt("--naive", help="Ablation: scale without the stop-gradient.")] = False,
    fixed_gate: Annotated[float | None, Opt(help="Freeze every gate's alpha at this value.")] = None,
    post_layers: Annotated[int | None, Opt(help="Mix-LN: number of leading post-norm layers (default L//4).")] = None,
    device: Annotated[str, Opt(help="auto, cpu, cuda, cuda:N (under --dist, each rank takes cuda:LOCAL_RANK).")
                      ] = "auto",
    dist: Annotated[str, Opt(help="Under torchrun: ddp, or fsdp (FSDP2); --batch-size is per process.")] = "none",
    compile: Annotated[bool, Opt("--compile", help="torch.compile the model.")] = False,
    resume: Annotated[bool, Opt("--resume", help="Continue the run in --out from its latest checkpoint.")] = False,
    overwrite: Annotated[bool, Opt("--overwrite", help="Replace a run already in --out.")] = False,
    probe_every: Annotated[int, Opt(help="Record probes on step 1 and every N steps (0 = off).")] = 10,
    probe_schedule: Annotated[str, Opt(help="'every' N steps, or 'log' (log-spaced steps plus every N).")] = "every",
    probe_stats: Annotated[str, Opt(help="Comma list of statistic families to record.")] = ",".join(FAMILIES),
    verbose: Annotated[bool, Opt("--verbose", "-v", help="Log progress details.")] = False,
) -> None:
    """Train a model under one normalization scheme, with or without GPAS.

    Data-parallel on N processes: torchrun --nproc_per_node N -m gpas_probe.cli.main train --dist ddp ...
    """
    setup_logging(verbose)
    training = dict(steps=steps, lr=lr, warmup=warmup, batch_size=batch_size, seq_len=seq_len, seed=seed, data=data,
                    checkpoint_every=checkpoint_every, eval_every=eval_every, grad_clip=grad_clip,
                    gate_clip=clip_gate_grad, device=device, compile=compile or None)
    options = TrainOptions(preset=preset, norm=norm, gpas=gpas, gate=gate, naive=naive, fixed_gate=fixed_gate,
                           post_layers=post_layers, train=training, probe_every=probe_every,
                           probe_schedule=probe_schedule, probe_stats=probe_stats, out=out)
    seed_list = parse_seeds(seeds) if seeds is not None else None
    check_launch(dist)
    with distributed(dist, device) as ctx, reported_by_rank0(ctx):
        runs = seed_runs(options, seed_list, ctx) if seed_list else [options]
        for run in runs:
            _train_one(run, ctx, resume, overwrite)


def _train_one(options: TrainOptions, ctx: DistContext, resume: bool, overwrite: bool) -> None:
    model, tc, probe, run_dir = options.build(ctx)
    if not ctx.is_main and not logging.getLogger().isEnabledFor(logging.INFO):
        logging.getLogger().setLevel(logging.ERROR)  # without -v, warnings come from rank 0 alone
    label = run_label(model, ctx) + (f" seed {tc.seed}" if options.train.get("seed") is not None else "")
    result = run_with_progress(model, tc, run_dir, label, show=ctx.is_main, resume=resume, overwrite=overwrite,
                               probe=probe, dist=ctx)
    if not ctx.is_main:
        return
    val = result.final_val_loss
    console.print(f"trained {label} to step {result.step}"
                  + (f", validation loss {val:.4f}" if val is not None else "") + f"; run in {run_dir}"
                  + (f" (probes in {run_dir / 'probes'})" if probe else ""))
