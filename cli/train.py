"""``gpas-probe train``."""

from __future__ import annotations

from pathlib import Path

import typer
from gpas_probe.cli.common import console, friendly_errors, progress_bar, setup_logging

from gpas_probe.config import GateGranularity, ModelConfig, NormScheme, ScalingMode, TrainConfig, get_preset
from gpas_probe.probes import FAMILIES, ProbeConfig
from gpas_probe.train import StepInfo, TrainResult, train


def default_out(preset: str, norm: NormScheme, gpas: bool) -> Path:
    return Path("runs") / f"{preset}-{norm.value}{'-gpas' if gpas else ''}"


def configs(preset: str, norm: NormScheme, gpas: bool, overrides: dict, model_overrides: dict) -> tuple[
        ModelConfig, TrainConfig]:
    p = get_preset(preset)
    model = ModelConfig.from_preset(preset, norm=norm, gpas=gpas,
                                    **{k: v for k, v in model_overrides.items() if v is not None})
    train_kw = {**p.train, **{k: v for k, v in overrides.items() if v is not None}}
    return model, TrainConfig(**train_kw)


def run_with_progress(model: ModelConfig, tc: TrainConfig, out: Path, label: str, **kw) -> TrainResult:
    with progress_bar(label, tc.steps, "loss {task.fields[loss]} | {task.fields[tps]} tok/s",
                      loss="-", tps="-") as (bar, task):

        def on_step(info: StepInfo) -> None:
            bar.update(task, completed=info.step, loss=f"{info.loss:.3f}", tps=f"{info.tokens_per_s:,.0f}")

        return train(model, tc, out, callback=on_step, **kw)


@friendly_errors
def train_cmd(
    preset: str = typer.Option("small", help="Model/training preset: tiny, small, medium, 71m ... 7b."),
    norm: NormScheme = typer.Option(NormScheme.PRE, help="Normalization scheme."),
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
    gate: GateGranularity = typer.Option(GateGranularity.LAYER, help="One gate per layer or per sub-layer."),
    naive: bool = typer.Option(False, "--naive", help="Ablation: scale without the stop-gradient."),
    fixed_gate: float = typer.Option(None, help="Freeze every gate's alpha at this value."),
    post_layers: int = typer.Option(None, help="Mix-LN: number of leading post-norm layers (default L//4)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the model."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its latest checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a run already in --out."),
    probe_every: int = typer.Option(10, help="Record probes on step 1 and every N steps (0 = off)."),
    probe_schedule: str = typer.Option("every", help="'every' N steps, or 'log' (log-spaced steps plus every N)."),
    probe_stats: str = typer.Option(",".join(FAMILIES), help="Comma list of statistic families to record."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress details."),
) -> None:
    """Train a model under one normalization scheme, with or without GPAS."""
    setup_logging(verbose)
    model_kw = dict(post_layers=post_layers, gpas_granularity=gate,
                    gpas_mode=ScalingMode.NAIVE if naive else None)
    if fixed_gate is not None:
        model_kw.update(gpas_learnable=False, gpas_init=fixed_gate)
    model, tc = configs(preset, norm, gpas or naive, dict(
        steps=steps, lr=lr, warmup=warmup, batch_size=batch_size, seq_len=seq_len, seed=seed, data=data,
        checkpoint_every=checkpoint_every, eval_every=eval_every, grad_clip=grad_clip,
        gate_clip=clip_gate_grad, device=device, compile=compile or None), model_kw)
    out = out or default_out(preset, model.norm, model.gpas)
    label = f"{model.norm.value}{'+gpas' if model.gpas else ''}"
    probe = probe_config(probe_every, probe_schedule, probe_stats)
    result = run_with_progress(model, tc, out, label, resume=resume, overwrite=overwrite, probe=probe)
    val = result.final_val_loss
    console.print(f"trained {label} to step {result.step}"
                  + (f", validation loss {val:.4f}" if val is not None else "") + f"; run in {out}"
                  + (f" (probes in {out / 'probes'})" if probe else ""))


def probe_config(every: int, schedule: str = "every", stats: str = ",".join(FAMILIES)) -> ProbeConfig | None:
    """The CLI's probe options as a ProbeConfig; ``every == 0`` with the 'every' schedule turns probes off."""
    if every == 0 and schedule == "every":
        return None
    return ProbeConfig(every=every, schedule=schedule, stats=tuple(s.strip() for s in stats.split(",") if s.strip()))
