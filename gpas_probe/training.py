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

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from gpas_probe.checkpoints import save_checkpoint
from gpas_probe.config import ModelConfig, TrainConfig
from gpas_probe.data import Batches, Corpus, load_corpus
from gpas_probe.distributed import (
    DistContext,
    clip_grad_norm,
    distributed,
    full_model_state,
    load_optimizer_state,
    mark_quiet,
    mark_shared,
    optimizer_state,
    replicated_parameters,
    wrap_model,
)
from gpas_probe.gpas import clip_gate_grad_
from gpas_probe.model import Transformer, build_model
from gpas_probe.probes import Driver, Probe, ProbeConfig
from gpas_probe.runs import TRAINER_STATE, checkpoint_path, prepare, restore_weights, run_meta, tidy_resumed

log = logging.getLogger(__name__)

@dataclass
class StepInfo:
    """What one optimizer step reports to callbacks and observers."""

    step: int
    loss: float
    lr: float
    grad_norm: float
    tokens: int
    tokens_per_s: float
    val_loss: float | None = None


class StepObserver(Protocol):
    """Called by :func:`train` around each step; the probes implement it."""

    def begin_step(self, step: int) -> None: ...
    def after_backward(self, step: int) -> None: ...
    def end_step(self, info: StepInfo) -> None: ...


@dataclass
class TrainResult:
    model: Transformer
    out: Path | None
    step: int
    history: list[StepInfo] = field(default_factory=list)

    @property
    def final_val_loss(self) -> float | None:
        vals = [h.val_loss for h in self.history if h.val_loss is not None]
        return vals[-1] if vals else None


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak lr for update number ``step`` (1-based)."""
    if step <= cfg.warmup:
        return step / max(1, cfg.warmup)
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; with weight decay, only matrices decay (not norms, biases or gates)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
             device: torch.device) -> float:
    """Mean validation loss over fixed batches."""
    was_training = model.training
    model.eval()
    total = 0.0
    for x, y in batches:
        with _autocast(device):
            total += model(x.to(device), y.to(device)).loss.item()
    model.train(was_training)
    return total / len(batches)


def _autocast(device: torch.device) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


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
          meta: dict[str, Any] | None = None, dist: str | DistContext = "none") -> TrainResult:
    """Train a model from scratch (or ``resume`` the run in ``out``) and return it.

    ``probe`` records statistics into ``out/probes/`` (see :class:`gpas_probe.probes.ProbeConfig`).
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
                      observers, callback, probe, meta or {})


def _train(ctx: DistContext, model_config: ModelConfig, cfg: TrainConfig, run_dir: Path | None, resume: bool,
           overwrite: bool, observers: Sequence[StepObserver], callback: Callable[[StepInfo], None] | None,
           probe: ProbeConfig | None, meta: dict[str, Any]) -> TrainResult:
    if probe is not None and run_dir is None:
        raise mark_shared(ValueError("probes need an output folder (out=...)"))

    def load_data() -> tuple[Batches, list[tuple[torch.Tensor, torch.Tensor]]]:
        corpus = load_corpus(cfg.data)
        _check_inputs(model_config, cfg, corpus)
        batches = Batches(corpus, cfg.batch_size, cfg.seq_len, cfg.seed)
        return batches, batches.val(cfg.eval_batches, ctx.rank, ctx.world)

    batches, val_batches = ctx.agree(load_data)
    torch.manual_seed(cfg.seed)
    model = build_model(model_config).to(ctx.device)
    meta = run_meta(model_config, cfg, {**meta, "world_size": ctx.world})
    ckpt: str | None = None
    if run_dir is not None:
        ckpt = ctx.on_main(lambda: prepare(run_dir, meta, resume, overwrite))
    trainer_state: dict[str, Any] | None = None
    start = 0
    if ckpt is not None:
        trainer_state = ctx.agree(lambda: restore_weights(model, Path(ckpt), ctx.device))
        start = int(trainer_state["step"])
        log.info("resumed %s at step %d", run_dir, start)
    fwd = wrap_model(model, ctx)
    optimizer = make_optimizer(model, cfg)
    if trainer_state is not None:
        load_optimizer_state(model, optimizer, trainer_state["optimizer"], ctx)
    if resume and run_dir is not None:
        ctx.on_main(lambda: tidy_resumed(run_dir, start))
    if start >= cfg.steps:
        log.info("nothing to do: the run is already at step %d of %d", start, cfg.steps)
    probe_meta = {k: v for k, v in meta.items() if not k.endswith("_version")}  # the store adds versions
    session = None
    if probe is not None:
        session = Probe(model, run_dir, config=probe, meta=probe_meta, driver=Driver.for_training(ctx))
    loop = _Loop(model, fwd, optimizer, cfg, batches, val_batches, ctx, run_dir,
                 [*observers, session] if session else list(observers), session, callback)
    try:
        return loop.run(start)
    finally:
        if session is not None:
            session.close()


@dataclass
class _Loop:
    model: Transformer  # the model itself (sharded in place under FSDP)
    fwd: nn.Module  # what forward/backward run through (the DDP wrapper or the model; compiled in run)
    optimizer: torch.optim.Optimizer
    cfg: TrainConfig
    batches: Batches
    val_batches: list[tuple[torch.Tensor, torch.Tensor]]
    ctx: DistContext
    run_dir: Path | None
    observers: Sequence[StepObserver]
    session: Probe | None
    callback: Callable[[StepInfo], None] | None

    def run(self, start: int) -> TrainResult:
        cfg, ctx, model = self.cfg, self.ctx, self.model
        # A recorded step runs the eager module: probe hooks never enter the compiled graph, so
        # recording neither recompiles it nor traces the statistics code (one graph for training).
        compiled = torch.compile(self.fwd) if cfg.compile else self.fwd
        # DDP's wrapper adds nothing to a no-grad pass; a recorded step evaluates eagerly too (hooks are on)
        eval_eager, eval_compiled = (model, model) if ctx.mode == "ddp" else (self.fwd, compiled)
        params = [p for p in model.parameters() if p.requires_grad]
        replicated = replicated_parameters(model) if ctx.mode == "fsdp" else []
        tokens_per_step = cfg.batch_size * ctx.world * cfg.seq_len
        history: list[StepInfo] = []
        model.train()
        t_last = time.perf_counter()
        for step in range(start + 1, cfg.steps + 1):
            for g in self.optimizer.param_groups:
                g["lr"] = cfg.lr * lr_factor(step, cfg)
            for o in self.observers:
                o.begin_step(step)
            x, y = (t.to(ctx.device, non_blocking=True) for t in self.batches.train(step, ctx.rank, ctx.world))
            recorded = self.session is not None and self.session.recording_step == step
            with _autocast(ctx.device):
                loss = (self.fwd if recorded else compiled)(x, y).loss
            loss.backward()
            ctx.average_replicated_grads(replicated)
            for o in self.observers:
                o.after_backward(step)
            grad_norm = clip_grad_norm(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf, ctx)
            clip_gate_grad_(model, cfg.gate_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

            loss_value = ctx.mean(loss.detach())
            now = time.perf_counter()
            info = StepInfo(step, loss_value, self.optimizer.param_groups[0]["lr"], grad_norm,
                            step * tokens_per_step, tokens_per_step / max(now - t_last, 1e-9))
            t_last = now
            finite, last = math.isfinite(loss_value), step == cfg.steps
            if finite and ((cfg.eval_every and step % cfg.eval_every == 0) or last):
                net = eval_eager if recorded else eval_compiled
                info.val_loss = ctx.mean(evaluate(net, self.val_batches, ctx.device))
                log.info("step %d: loss %.4f, val loss %.4f", step, loss_value, info.val_loss)
            for o in self.observers:
                o.end_step(info)
            history.append(info)
            if self.callback is not None:
                self.callback(info)
            if not finite:
                raise self._non_finite(step, loss_value)
            if self.run_dir is not None and ((cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or last):
                if self.session is not None:
                    self.session.flush()  # the probe table on disk reaches every step the checkpoint covers
                self._save(step)
                t_last = time.perf_counter()  # checkpoint time is not training throughput
        model.eval()
        return TrainResult(model, self.run_dir, max(start, cfg.steps), history)

    def _non_finite(self, step: int, loss: float) -> FloatingPointError:
        """The error for a non-finite loss, after the probes have written what they recorded."""
        session = self.session
        rerun = "rerun with --probe-every 1 to find the first layer and site that went non-finite"
        if session is None:
            where = f"probes were off; {rerun}"
        elif "activations" not in session.config.stats:
            where = "the probes do not record activations; rerun with them and --probe-every 1"
        elif session.last_recorded_step != step:
            where = f"the probes did not record step {step}; {rerun}"
        elif (first := session.first_non_finite()) is not None:
            layer, site, direction = first
            what = "activation" if direction == "fwd" else "gradient"
            where = f"first non-finite value at layer {layer}, site {site} ({what})"
        else:
            where = f"every activation the probes recorded at step {step} is finite"
        if session is not None:
            session.flush()
        error = mark_shared(FloatingPointError(f"non-finite loss ({loss}) at step {step}; {where}"))
        return mark_quiet(error) if not self.ctx.is_main else error

    def _save(self, step: int) -> None:
        ctx = self.ctx
        state = full_model_state(self.model, ctx)  # collectives under FSDP: every rank takes part
        trainer_state = {"step": step, "optimizer": optimizer_state(self.model, self.optimizer, ctx)}
        path = checkpoint_path(self.run_dir, step)  # type: ignore[arg-type]
        ctx.on_main(lambda: save_checkpoint(self.model, path, step=step, extra_files={TRAINER_STATE: trainer_state},
                                            state=state))
