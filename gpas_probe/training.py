"""The training loop: Adam(W), linear warmup + cosine decay to ``min_lr_ratio`` x peak, global and
GPAS-gate gradient clipping, periodic validation, atomic checkpoints and exact resume, in one
process or data-parallel under ``torchrun`` (DDP or FSDP2, see :mod:`gpas_probe.distributed`).

A run folder (:mod:`gpas_probe.runs`) holds ``run.json`` (configs, versions) and
``checkpoints/step_NNNNNN/`` (HF-layout weights plus ``trainer_state.pt``). Observers (the probes) are
called at fixed points of each step.

Crash safety: ``run.json``, probe chunks and checkpoints are each written under a temporary name
and renamed into place, and the probe rows are flushed before each checkpoint, so a run killed at
any moment leaves only whole files and a probe table that covers every step up to its last
checkpoint. ``resume`` continues from that checkpoint, removes what an interrupted write left
behind, and drops probe rows of later steps (recorded before the run stopped) so that the resumed
run's rows replace them: every kept (step, layer, site, direction, stat) appears once.
"""


import dataclasses
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gpas_probe.config import ModelConfig, TrainConfig
from gpas_probe.data import Batches, Corpus, load_corpus
from gpas_probe.distributed import (
    DistContext,
    distributed,
    load_optimizer_state,
    mark_shared,
    wrap_model,
)
from gpas_probe.interrupt import deferred_interrupt
from gpas_probe.loggers import LogConfig, LogTo
from gpas_probe.loop import Loop, StepInfo, StepObserver, TrainResult, evaluate, lr_factor, make_optimizer
from gpas_probe.model import Transformer, build_model
from gpas_probe.probes import Driver, Probe, ProbeConfig
from gpas_probe.progress import ProgressReport
from gpas_probe.runs import (
    discard_run,
    open_run,
    record_resume,
    restore_weights,
    run_meta,
    tidy_resumed,
)
from gpas_probe.threads import use_threads

__all__ = ["StepInfo", "StepObserver", "TrainResult", "evaluate", "lr_factor", "make_optimizer", "train"]

log = logging.getLogger(__name__)


def _check_inputs(model_config: ModelConfig, cfg: TrainConfig, corpus: Corpus) -> None:
    if cfg.seq_len > model_config.max_seq_len:
        raise ValueError(f"--seq-len {cfg.seq_len} is longer than the model's maximum of {model_config.max_seq_len}")
    if corpus.max_token >= model_config.vocab_size:
        raise ValueError(f"{corpus.name}: token id {corpus.max_token} is beyond the model's vocabulary "
                         f"of {model_config.vocab_size}")
    if corpus.min_token < 0:
        raise ValueError(f"{corpus.name}: negative token id {corpus.min_token}")

def train(model_config: ModelConfig, train_config: TrainConfig, out: str | Path | None = None, *,
          resume: bool = False, overwrite: bool = False, observers: Sequence[StepObserver] = (),
          callback: Callable[[StepInfo], None] | None = None, probe: ProbeConfig | None = None,
          meta: dict[str, Any] | None = None, dist: str | DistContext = "none", progress: str = "auto",
          label: str | None = None, log_to: LogTo = None) -> TrainResult:
    """Train a model from scratch (or ``resume`` the run in ``out``) and return it.

    ``out`` is locked for the run's life (:mod:`gpas_probe.lock`): a second writer is refused. Resume
    checkpoints are written automatically (:mod:`gpas_probe.autosave`, ``train_config.autosave``), and
    Ctrl-C stops at the end of the step with a checkpoint (:mod:`gpas_probe.interrupt`), so ``resume``
    loses at most the steps since the last save; with no checkpoint to resume from it is refused. A new
    run that fails before its first checkpoint (out of memory, a full disk) leaves no folder behind.
    A resumed run keeps its learning-rate schedule: a longer ``steps`` continues at the final rate.

    ``progress`` (:data:`gpas_probe.progress.MODES`) shows progress under ``label``: a bar in a terminal or
    notebook, log lines otherwise, or ``"off"``.

    ``probe`` records statistics into ``out/probes/`` (see :class:`gpas_probe.probes.ProbeConfig`);
    ``log_to`` (``"tensorboard,wandb,mlflow"``, or a :class:`gpas_probe.loggers.LogConfig`) also sends each
    recorded step's per-layer summary to those loggers, from rank 0 (TensorBoard files in ``out/tensorboard``,
    W&B's in ``out/wandb``).
    ``callback`` receives a :class:`StepInfo` after every step (the CLI draws its progress bar from
    it); ``observers`` are called around each step (see :class:`StepObserver`).

    ``dist`` (``"ddp"`` or ``"fsdp"`` under ``torchrun``, or a :class:`~gpas_probe.distributed.DistContext`)
    trains data-parallel: ``train_config.batch_size`` rows per rank, so the global batch is
    ``batch_size * world`` (see :mod:`gpas_probe.distributed`); only rank 0 writes to ``out``.

    A non-finite loss stops training with :class:`FloatingPointError` once the probes have recorded
    the step and written their rows; the message names the first layer and site that went
    non-finite when the step was recorded.
    """
    with distributed(dist, train_config.device) as ctx:
        return _train(ctx, model_config, train_config, Path(out) if out is not None else None, resume, overwrite,
                      observers, callback, probe, meta or {}, progress, label, log_to)


def _train(ctx: DistContext, model_config: ModelConfig, cfg: TrainConfig, run_dir: Path | None, resume: bool,
           overwrite: bool, observers: Sequence[StepObserver], callback: Callable[[StepInfo], None] | None,
           probe: ProbeConfig | None, meta: dict[str, Any], progress: str, label: str | None,
           log_to: LogTo = None) -> TrainResult:
    if probe is not None and run_dir is None:
        raise mark_shared(ValueError("probes need an output folder (out=...)"))
    try:  # a bad name or a missing extra: every rank stops, before the run folder is touched
        logs = LogConfig.of(log_to)
        if logs is not None:
            logs.require()
    except (ValueError, ImportError) as e:
        raise mark_shared(e) from None
    if logs is not None and probe is None:
        raise mark_shared(ValueError("--log-to (log_to) sends the probes' summaries, and probes are off "
                                     "(--probe-every 0, probe=None): turn them on or leave --log-to out"))

    def load_data() -> tuple[Batches, list[tuple[torch.Tensor, torch.Tensor]]]:
        corpus = load_corpus(cfg.data)
        _check_inputs(model_config, cfg, corpus)
        batches = Batches(corpus, cfg.batch_size, cfg.seq_len, cfg.seed)
        return batches, batches.val(cfg.eval_batches, ctx.rank, ctx.world)

    batches, val_batches = ctx.agree(load_data)
    torch.manual_seed(cfg.seed)
    model = build_model(model_config).to(ctx.device)
    meta = run_meta(model_config, cfg, {**meta, "world_size": ctx.world,
                                        "probe_config": probe.to_dict() if probe is not None else None})
    opened = ctx.on_main(lambda: open_run(run_dir, meta, resume, overwrite)) if run_dir is not None else None
    lock = opened.lock if opened is not None and ctx.is_main else None
    resumed = opened.resumed if opened is not None else None
    try:
        trainer_state: dict[str, Any] | None = None
        start = 0
        if resumed is not None:
            cfg = dataclasses.replace(cfg, schedule_steps=resumed.schedule_steps)
            trainer_state = ctx.agree(lambda: restore_weights(model, Path(resumed.checkpoint), ctx.device))
            start = int(trainer_state["step"])
            log.info("resumed %s at step %d (%s)", run_dir, start, resumed.checkpoint)
        fwd = wrap_model(model, ctx)
        optimizer = make_optimizer(model, cfg)
        if trainer_state is not None:
            load_optimizer_state(model, optimizer, trainer_state["optimizer"], ctx)
        if resumed is not None and run_dir is not None:
            meta["train_config"] = cfg.to_dict()
            ctx.on_main(lambda: (tidy_resumed(run_dir, start), record_resume(run_dir, meta, start)))
        if lock is not None:
            lock.announce()
        if start >= cfg.steps:
            log.info("nothing to do: the run is already at step %d of %d", start, cfg.steps)
        result = _run(ctx, model, fwd, optimizer, cfg, batches, val_batches, run_dir, start, observers, callback,
                      probe, meta, progress, label or model_config.label(), logs)
    except BaseException as e:
        if lock is not None and resumed is None and not isinstance(e, (FloatingPointError, KeyboardInterrupt)):
            discard_run(run_dir)  # a failed start leaves no half-made run
        raise
    finally:
        if lock is not None:
            lock.release()
    return result


def _run(ctx: DistContext, model: Transformer, fwd: nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig,
         batches: Batches, val_batches: list[tuple[torch.Tensor, torch.Tensor]], run_dir: Path | None, start: int,
         observers: Sequence[StepObserver], callback: Callable[[StepInfo], None] | None,
         probe: ProbeConfig | None, meta: dict[str, Any], progress: str, label: str | None,
         logs: LogConfig | None = None) -> TrainResult:
    probe_meta = {k: v for k, v in meta.items() if not k.endswith("_version")}  # the store adds versions
    session = None
    if probe is not None:  # loggers open on rank 0 only (the one that writes); one failing to open stops every rank
        session = ctx.agree(lambda: Probe(model, run_dir, config=probe, meta=probe_meta,
                                          driver=Driver.for_training(ctx), log_to=logs))
    threads = use_threads(cfg.threads, device=ctx.device)
    report = None
    if ctx.is_main and progress != "off":
        report = ProgressReport(label or "train", cfg.steps, start=start, mode=progress)
    callbacks = [c for c in (report, callback, threads.check) if c is not None]
    loop = Loop(model, fwd, optimizer, cfg, batches, val_batches, ctx, run_dir,
                 [*observers, session] if session else list(observers), session, callbacks)
    try:
        with deferred_interrupt(enabled=not ctx.distributed and run_dir is not None) as interrupt:
            loop.interrupt = interrupt
            return loop.run(start)
    finally:
        if report is not None:
            report.close()
        if session is not None:
            session.close()
