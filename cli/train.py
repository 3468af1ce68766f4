"""``gpas-probe train`` (one process, or data-parallel under ``torchrun`` with ``--dist ddp|fsdp``)."""

from __future__ import annotations

import logging
from enum import Enum
from pathlib import Path
from typing import TypeVar

import typer

from gpas_probe.cli.common import (
    USER_ERRORS,
    console,
    err_console,
    error_line,
    friendly_errors,
    progress_bar,
    setup_logging,
)
from gpas_probe.config import GateGranularity, ModelConfig, NormScheme, ScalingMode, TrainConfig, get_preset
from gpas_probe.distributed import DIST_MODES, DistContext, distributed, mark_quiet, mark_shared, torchrun_world_size
from gpas_probe.probes import FAMILIES, ProbeConfig
from gpas_probe.train import StepInfo, TrainResult, train

E = TypeVar("E", bound=Enum)


def parse_choice(value: str | E, enum: type[E], what: str) -> E:
    """``value`` as a member of ``enum``, or a one-line error listing the choices."""
    if isinstance(value, enum):
        return value
    try:
        return enum(value)
    except ValueError:
        raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(m.value for m in enum)}") from None


def default_out(preset: str, norm: NormScheme, gpas: bool) -> Path:
    return Path("runs") / f"{preset}-{norm.value}{'-gpas' if gpas else ''}"


def configs(preset: str, norm: NormScheme, gpas: bool, overrides: dict, model_overrides: dict) -> tuple[
        ModelConfig, TrainConfig]:
    p = get_preset(preset)
    model = ModelConfig.from_preset(preset, norm=norm, gpas=gpas,
                                    **{k: v for k, v in model_overrides.items() if v is not None})
    train_kw = {**p.train, **{k: v for k, v in overrides.items() if v is not None}}
    return model, TrainConfig(**train_kw)


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
    preset: str = typer.Option("small", help="Model/training preset: tiny, small, medium, 71m ... 7b."),
    norm: str = typer.Option("pre", help="Normalization scheme: " + ", ".join(m.value for m in NormScheme) + "."),
    gpas: bool = typer.Option(False, "--gpas/--no-gpas", help="Add GPAS gates."),
    steps: int = typer.Option(None, help="Optimizer steps (default: the preset's)."),
    lr: float = typer.Option(None, help="Peak learning rate."),
    warmup: int = typer.Option(None, help="Linear warmup steps."),
    batch_size: int = typer.Option(None, help="Sequences per step."),
    seq_len: int = typer.Option(None, help="Tokens per sequence."),
    seed: int = typer.Option(None, help="Seed for init and batches."),
    data: str = typer.Option(None, help="'builtin' (Python's stdlib source), a text file, or .npy/.bin tokens."),
    out: Path = typer.Option(None, "--out", "-o", help="Run directory (default runs/PRESET-NORM[-gpas])."),
    checkpoint_every: int = typer.Option(None, help="Checkpoint every N steps (0 = only at the end)."),
    eval_every: int = typer.Option(None, help="Validation every N steps (0 = only at the end)."),
    grad_clip: float = typer.Option(None, help="Global gradient-norm clip (0 = off)."),
    clip_gate_grad: float = typer.Option(None, help="Joint GPAS gate-gradient clip (0 = off)."),
    gate: str = typer.Option("layer", help="One GPAS gate per layer, or per sub-layer: layer, sublayer."),
    naive: bool = typer.Option(False, "--naive", help="Ablation: scale without the stop-gradient."),
    fixed_gate: float = typer.Option(None, help="Freeze every gate's alpha at this value."),
    post_layers: int = typer.Option(None, help="Mix-LN: number of leading post-norm layers (default L//4)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N (under --dist, each rank takes cuda:LOCAL_RANK)."),
    dist: str = typer.Option("none", help="Under torchrun: ddp, or fsdp (FSDP2); --batch-size is per process."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the model."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its latest checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a run already in --out."),
    probe_every: int = typer.Option(10, help="Record probes on step 1 and every N steps (0 = off)."),
    probe_schedule: str = typer.Option("every", help="'every' N steps, or 'log' (log-spaced steps plus every N)."),
    probe_stats: str = typer.Option(",".join(FAMILIES), help="Comma list of statistic families to record."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress details."),
) -> None:
    """Train a model under one normalization scheme, with or without GPAS.

    Data-parallel on N processes: torchrun --nproc_per_node N -m gpas_probe.cli.main train --dist ddp ...
    """
    setup_logging(verbose)
    if dist not in DIST_MODES:
        raise ValueError(f"unknown --dist {dist!r}; choose one of {', '.join(DIST_MODES)}")
    world = torchrun_world_size()
    if dist == "none" and world is not None and world > 1:
        raise ValueError(f"this is one of {world} torchrun processes: pass --dist ddp or --dist fsdp "
                         "(with --dist none each would train alone into the same folder)")
    with distributed(dist, device) as ctx:
        try:
            _train(ctx, preset=preset, norm=norm, gpas=gpas, gate=gate, naive=naive, fixed_gate=fixed_gate,
                   post_layers=post_layers, out=out, resume=resume, overwrite=overwrite, probe_every=probe_every,
                   probe_schedule=probe_schedule, probe_stats=probe_stats,
                   train_kw=dict(steps=steps, lr=lr, warmup=warmup, batch_size=batch_size, seq_len=seq_len,
                                 seed=seed, data=data, checkpoint_every=checkpoint_every, eval_every=eval_every,
                                 grad_clip=grad_clip, gate_clip=clip_gate_grad, device=device,
                                 compile=compile or None))
        except USER_ERRORS as e:
            if ctx.distributed and getattr(e, "shared", False) and not getattr(e, "quiet", False):
                # rank 0 reports before the ranks leave together: torchrun stops the other processes
                # as soon as one exits, so a report printed after that might never appear
                err_console.print(f"[bold red]error:[/] {error_line(e)}", highlight=False, soft_wrap=True)
                mark_quiet(e)
            raise


def _train(ctx: DistContext, *, preset: str, norm: str, gpas: bool, gate: str, naive: bool, fixed_gate: float | None,
           post_layers: int | None, out: Path | None, resume: bool, overwrite: bool, probe_every: int,
           probe_schedule: str, probe_stats: str, train_kw: dict) -> None:
    try:
        scheme = parse_choice(norm, NormScheme, "scheme")
        model_kw = dict(post_layers=post_layers, gpas_granularity=parse_choice(gate, GateGranularity, "gate"),
                        gpas_mode=ScalingMode.NAIVE if naive else None)
        if fixed_gate is not None:
            model_kw.update(gpas_learnable=False, gpas_init=fixed_gate)
        model, tc = configs(preset, scheme, gpas or naive, train_kw, model_kw)
        probe = probe_config(probe_every, probe_schedule, probe_stats)
    except USER_ERRORS as e:  # the same arguments on every rank: every rank raises this
        raise mark_shared(mark_quiet(e) if not ctx.is_main else e) from None
    if not ctx.is_main and not logging.getLogger().isEnabledFor(logging.INFO):
        logging.getLogger().setLevel(logging.ERROR)  # without -v, warnings come from rank 0 alone
    out = out or default_out(preset, model.norm, model.gpas)
    label = f"{model.norm.value}{'+gpas' if model.gpas else ''}"
    if ctx.distributed:
        label += f" ({ctx.mode} x{ctx.world})"
    result = run_with_progress(model, tc, out, label, show=ctx.is_main, resume=resume, overwrite=overwrite,
                               probe=probe, dist=ctx)
    if not ctx.is_main:
        return
    val = result.final_val_loss
    console.print(f"trained {label} to step {result.step}"
                  + (f", validation loss {val:.4f}" if val is not None else "") + f"; run in {out}"
                  + (f" (probes in {out / 'probes'})" if probe else ""))


def probe_config(every: int, schedule: str = "every", stats: str = ",".join(FAMILIES)) -> ProbeConfig | None:
    """The CLI's probe options as a ProbeConfig; ``every == 0`` with the 'every' schedule turns probes off."""
    if every == 0 and schedule == "every":
        return None
    return ProbeConfig(every=every, schedule=schedule, stats=tuple(s.strip() for s in stats.split(",") if s.strip()))
