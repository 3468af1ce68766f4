"""``gpas-probe train`` (one process, or data-parallel under ``torchrun`` with ``--dist ddp|fsdp``)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from gpas_probe.cli.common import USER_ERRORS, console, err_console, friendly_errors, print_next, setup_logging
from gpas_probe.config import NormScheme
from gpas_probe.errors import first_line
from gpas_probe.probes.config import FAMILIES

if TYPE_CHECKING:  # the command imports torch when it runs, not when the CLI starts
    from gpas_probe.distributed import DistContext
    from gpas_probe.launch import TrainOptions

Opt = typer.Option


@friendly_errors
def train_cmd(
    typer_ctx: typer.Context,
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
    checkpoint_every: Annotated[int | None, Opt(help="Keep a checkpoint every N steps (0 = only the final one).")
                                ] = None,
    keep_last: Annotated[int | None, Opt(help="Keep only the latest N of those checkpoints, the final one included "
                                              "(default 0 = all).")] = None,
    autosave: Annotated[float | None, Opt(help="Seconds at least between automatic resume checkpoints (default 60, "
                                               "longer when saving is slow; 0 = off).")] = None,
    eval_every: Annotated[int | None, Opt(help="Validation every N steps (0 = only at the end).")] = None,
    grad_clip: Annotated[float | None, Opt(help="Global gradient-norm clip (0 = off).")] = None,
    gate_grad_clip: Annotated[float | None, Opt("--gate-grad-clip", "--clip-gate-grad",
                                                help="Joint GPAS gate-gradient norm clip, after --grad-clip "
                                                     "(0 = off).")] = None,
    gate: Annotated[str | None, Opt(help="With --gpas: one gate per layer, or per sub-layer: layer (default), "
                                         "sublayer.")] = None,
    naive: Annotated[bool, Opt("--naive", help="Ablation: scale without the stop-gradient.")] = False,
    fixed_gate: Annotated[float | None, Opt(help="Freeze every gate's alpha at this value.")] = None,
    post_layers: Annotated[int | None, Opt(help="Mix-LN: number of leading post-norm layers (default L//4).")] = None,
    device: Annotated[str, Opt(help="auto, cpu, cuda, cuda:N (under --dist, each rank takes cuda:LOCAL_RANK).")
                      ] = "auto",
    dist: Annotated[str, Opt(help="Under torchrun: ddp, or fsdp (FSDP2); --batch-size is per process.")] = "none",
    compile: Annotated[bool, Opt("--compile", help="torch.compile the model.")] = False,
    threads: Annotated[int | None, Opt(help="CPU threads (default 0: as many as cores are free, "
                                            "re-checked during the run; see the README's performance "
                                            "section).")] = None,
    resume: Annotated[bool, Opt("--resume", help="Continue the run in --out from its latest checkpoint, with its own "
                                                 "settings (options given here may change steps, evaluation, "
                                                 "checkpoints, device and probes).")] = False,
    overwrite: Annotated[bool, Opt("--overwrite", help="Replace a run already in --out.")] = False,
    probe_every: Annotated[int, Opt(help="Record probes on step 1 and every N steps (0 = off).")] = 10,
    probe_schedule: Annotated[str, Opt(help="'every' N steps, or 'log' (log-spaced steps plus every N).")] = "every",
    probe_stats: Annotated[str, Opt(help="Comma list of statistic families to record.")] = ",".join(FAMILIES),
    log_to: Annotated[str | None, Opt(help="Also send each recorded step's per-layer summary to these loggers: "
                                           "comma list of tensorboard, wandb, mlflow (rank 0 only; the probe "
                                           "table stays the record).")] = None,
    verbose: Annotated[bool, Opt("--verbose", "-v", help="Log progress details.")] = False,
) -> None:
    """Train a model under one normalization scheme, with or without GPAS.

    Data-parallel on N processes: torchrun --nproc_per_node N -m gpas_probe.cli.main train --dist ddp ...
    """
    from gpas_probe.distributed import check_launch, distributed
    from gpas_probe.launch import TrainOptions, parse_seeds, seed_runs

    setup_logging(verbose)
    training = dict(steps=steps, lr=lr, warmup=warmup, batch_size=batch_size, seq_len=seq_len, seed=seed, data=data,
                    checkpoint_every=checkpoint_every, keep_last=keep_last, autosave=autosave, eval_every=eval_every,
                    grad_clip=grad_clip, gate_clip=gate_grad_clip, device=device, compile=compile or None,
                    threads=threads)
    options = TrainOptions(preset=preset, norm=norm, gpas=gpas, gate=gate, naive=naive, fixed_gate=fixed_gate,
                           post_layers=post_layers, train=training, probe_every=probe_every,
                           probe_schedule=probe_schedule, probe_stats=probe_stats, out=out, log_to=log_to)
    seed_list = parse_seeds(seeds) if seeds is not None else None
    check_launch(dist)
    given = _given(typer_ctx)
    with distributed(dist, device) as ctx, reported_by_rank0(ctx):
        runs = seed_runs(options, seed_list, ctx) if seed_list else [options]
        trained = [_train_one(run, ctx, given if resume else None, overwrite) for run in runs]
    if ctx.is_main:
        _suggest([folder for folder, _ in trained], probed=all(probed for _, probed in trained))


@contextmanager
def reported_by_rank0(ctx: DistContext) -> Iterator[None]:
    """Under ``torchrun``, an input error every rank raises together is printed by rank 0 before the ranks
    leave (torchrun stops the other processes as soon as one exits, so a report printed after that might
    never appear); the error is then marked as reported. One process: nothing changes."""
    from gpas_probe.distributed import mark_quiet

    try:
        yield
    except USER_ERRORS as e:
        if ctx.distributed and getattr(e, "shared", False) and not getattr(e, "quiet", False):
            err_console.print(f"[bold red]error:[/] {escape(first_line(e))}", highlight=False, soft_wrap=True)
            mark_quiet(e)
        raise


def _given(typer_ctx: typer.Context) -> set[str]:
    """The options typed on the command line, by their :class:`TrainOptions` names."""
    names = {"gate_grad_clip": "gate_clip"}
    return {names.get(name, name) for name in typer_ctx.params
            if getattr(typer_ctx.get_parameter_source(name), "name", None) == "COMMANDLINE"}


def _suggest(folders: list[Path], probed: bool) -> None:
    """What to look at next, with the runs just trained."""
    profile = ["profile", *folders]
    if not probed:
        print_next(profile)
    elif len(folders) == 1:
        print_next(["plot", "variance", folders[0]], ["diagnose", folders[0]], profile)
    else:
        print_next(["compare", *folders], ["plot", "loss", *folders], profile)


def _train_one(options: TrainOptions, ctx: DistContext, resume_given: set[str] | None, overwrite: bool
               ) -> tuple[Path, bool]:
    """Train one run; its folder, and whether it recorded probes."""
    from gpas_probe.launch import run_label
    from gpas_probe.training import StepInfo, train

    resume = resume_given is not None
    model, tc, probe, run_dir = options.for_resume(resume_given, ctx) if resume else options.build(ctx)
    if not ctx.is_main and not logging.getLogger().isEnabledFor(logging.INFO):
        logging.getLogger().setLevel(logging.ERROR)  # without -v, warnings come from rank 0 alone
    label = run_label(model, ctx) + (f" seed {tc.seed}" if options.train.get("seed") is not None else "")
    announced: list[int] = []

    def announce(info: StepInfo) -> None:  # once the resume has passed every check and its first step ran
        if resume and ctx.is_main and not announced:
            announced.append(info.step)
            console.print(f"resumed {run_dir} ({label}) from its checkpoint of step {info.step - 1}, "
                          f"to step {tc.steps}", highlight=False)

    result = train(model, tc, run_dir, resume=resume, overwrite=overwrite, probe=probe, dist=ctx, label=label,
                   progress="auto" if ctx.is_main else "off", meta={"preset": options.preset}, callback=announce,
                   log_to=options.log_to)
    if not ctx.is_main:
        return run_dir, probe is not None
    val = result.final_val_loss
    console.print(f"trained {label} to step {result.step}"
                  + (f", validation loss {val:.4f}" if val is not None else "") + f"; run in {run_dir}"
                  + (f" (probes in {run_dir / 'probes'})" if probe else ""), highlight=False, soft_wrap=True)
    return run_dir, probe is not None
