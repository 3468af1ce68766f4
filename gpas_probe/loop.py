"""One training run's step loop: the learning-rate schedule, the optimizer, evaluation, and the loop that
calls the observers (the probes), the callbacks, the checkpoints and the automatic resume checkpoints
around each optimizer step (:func:`gpas_probe.training.train` sets it up)."""

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

from gpas_probe.autosave import MARK, Autosave, prune_autosaves, prune_kept
from gpas_probe.checkpoints import save_checkpoint
from gpas_probe.config import TrainConfig
from gpas_probe.data import Batches
from gpas_probe.distributed import (
    DistContext,
    clip_grad_norm,
    full_model_state,
    mark_quiet,
    mark_shared,
    optimizer_state,
    replicated_parameters,
)
from gpas_probe.gpas import clip_gate_grad_
from gpas_probe.interrupt import Interrupted
from gpas_probe.model import Transformer
from gpas_probe.probes import Probe
from gpas_probe.runs import TRAINER_STATE, checkpoint_path

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
    """Multiplier of the peak lr for update number ``step`` (1-based): linear warmup, then a cosine over
    the schedule's length (``schedule_steps``, default ``steps``) down to ``min_lr_ratio``, which then
    holds (a resumed run extended beyond its schedule continues at the final rate)."""
    if step <= cfg.warmup:
        return step / max(1, cfg.warmup)
    total = cfg.schedule_steps or cfg.steps
    progress = (step - cfg.warmup) / max(1, total - cfg.warmup)
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


@dataclass
class Loop:
    """The steps ``start + 1 .. cfg.steps`` of one run (:meth:`run`)."""

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
    callbacks: Sequence[Callable[[StepInfo], None]]
    interrupt: Any = None  # gpas_probe.interrupt's flag: stop at the end of the step
    saved: bool = False  # a checkpoint was written

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
        autosave = Autosave(cfg.autosave if self.run_dir is not None else 0.0, ctx)
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
            for cb in self.callbacks:
                cb(info)
            if not finite:
                raise self._non_finite(step, loss_value)
            stop = self.interrupt is not None and self.interrupt.requested
            kept = bool(cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or last
            if self.run_dir is not None and (kept or stop or autosave.due(step)):
                began = time.monotonic()
                self._save(step, auto=not kept)
                autosave.saved(began)
                t_last = time.perf_counter()  # checkpoint time is not training throughput
            if stop:
                raise self._interrupted(step)
        if self.run_dir is not None:
            ctx.on_main(lambda: prune_autosaves(self.run_dir))  # type: ignore[arg-type]
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

    def _interrupted(self, step: int) -> Interrupted:
        return Interrupted(f"interrupted at step {step} of {self.cfg.steps}: checkpoint and probe rows saved; "
                           "continue with --resume")

    def _save(self, step: int, auto: bool = False) -> None:
        """A checkpoint of ``step`` (an automatic one, replaced by the next save, when ``auto``), after the
        probe rows: the probe table on disk reaches every step the checkpoint covers."""
        if self.session is not None:
            self.session.flush()
        ctx = self.ctx
        state = full_model_state(self.model, ctx)  # collectives under FSDP: every rank takes part
        trainer_state = {"step": step, "optimizer": optimizer_state(self.model, self.optimizer, ctx)}
        path = checkpoint_path(self.run_dir, step)  # type: ignore[arg-type]

        def write() -> None:
            save_checkpoint(self.model, path, step=step, extra_files={TRAINER_STATE: trainer_state}, state=state,
                            marks=(MARK,) if auto else ())
            prune_autosaves(self.run_dir, keep=path)  # type: ignore[arg-type]
            if not auto:
                prune_kept(self.run_dir, self.cfg.keep_last)  # type: ignore[arg-type]

        ctx.on_main(write)
        self.saved = True
