"""The training loop: Adam(W), linear warmup + cosine decay to ``min_lr_ratio`` x peak, global and
GPAS-gate gradient clipping, periodic validation, atomic checkpoints and exact resume.

A run directory holds ``run.json`` (configs, versions) and ``checkpoints/step_NNNNNN/`` (HF-layout
weights plus ``trainer_state.pt``). Observers (the probes) are called at fixed points of each step.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from gpas_probe import __version__
from gpas_probe.checkpoint import assign_weights, find_checkpoints, load_state, save_checkpoint
from gpas_probe.config import ModelConfig, TrainConfig
from gpas_probe.data import Batches, load_corpus
from gpas_probe.gpas import clip_gate_grad_
from gpas_probe.model import Transformer, build_model
from gpas_probe.probes import Probe, ProbeConfig

log = logging.getLogger(__name__)

RUN_META = "run.json"
TRAINER_STATE = "trainer_state.pt"


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


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = torch.device(device)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but no CUDA device is available")
    return d


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


def _run_meta(model_config: ModelConfig, train_config: TrainConfig, extra: dict[str, Any]) -> dict[str, Any]:
    return {"gpas_probe_version": __version__, "torch_version": torch.__version__,
            "model_config": model_config.to_dict(), "train_config": train_config.to_dict(), **extra}


def prepare_run_dir(out: Path, meta: dict[str, Any], resume: bool, overwrite: bool) -> None:
    """Create ``out`` for a new run, or check that a resumed run's configuration matches."""
    meta_path = out / RUN_META
    if meta_path.exists():
        if resume:
            old = json.loads(meta_path.read_text())
            meta = json.loads(json.dumps(meta))  # compare as stored (tuples become lists)
            if old.get("model_config") != meta["model_config"]:
                raise ValueError(f"{out}: --resume with a model configuration that differs from the run's")
            keep = {k: v for k, v in old["train_config"].items() if k not in ("steps", "device")}
            new = {k: v for k, v in meta["train_config"].items() if k not in ("steps", "device")}
            if keep != new:
                diff = sorted(k for k in keep if keep[k] != new.get(k))
                raise ValueError(f"{out}: --resume with training settings that differ from the run's: {diff}")
            return
        if not overwrite:
            raise FileExistsError(f"{out} already holds a run; pass --overwrite to replace it or --resume")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = meta_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    tmp.replace(meta_path)


def train(model_config: ModelConfig, train_config: TrainConfig, out: str | Path | None = None, *,
          resume: bool = False, overwrite: bool = False, observers: Sequence[StepObserver] = (),
          callback: Callable[[StepInfo], None] | None = None, probe: ProbeConfig | None = None,
          meta: dict[str, Any] | None = None) -> TrainResult:
    """Train a model from scratch (or ``resume`` the run in ``out``) and return it.

    ``probe`` records statistics into ``out/probes/`` (see :class:`gpas_probe.probes.ProbeConfig`).
    ``callback`` receives a :class:`StepInfo` after every step (the CLI draws its progress bar from
    it); ``observers`` are called around each step (see :class:`StepObserver`).
    """
    cfg = train_config
    device = resolve_device(cfg.device)
    corpus = load_corpus(cfg.data)
    if corpus.max_token >= model_config.vocab_size:
        raise ValueError(f"{corpus.name}: token id {corpus.max_token} is beyond the model's vocabulary "
                         f"of {model_config.vocab_size}")
    batches = Batches(corpus, cfg.batch_size, cfg.seq_len, cfg.seed)
    val_batches = batches.val(cfg.eval_batches)

    torch.manual_seed(cfg.seed)
    model = build_model(model_config).to(device)
    optimizer = make_optimizer(model, cfg)
    start = 0
    run_dir = Path(out) if out is not None else None
    run_meta = _run_meta(model_config, cfg, meta or {})
    if run_dir is not None:
        prepare_run_dir(run_dir, run_meta, resume, overwrite)
        if resume and (ckpts := find_checkpoints(run_dir)):
            start = _restore(model, optimizer, ckpts[-1], device)
            log.info("resumed %s at step %d", run_dir, start)
    if start >= cfg.steps:
        log.info("nothing to do: the run is already at step %d of %d", start, cfg.steps)
    if probe is not None and run_dir is None:
        raise ValueError("probes need an output folder (out=...)")
    probe_meta = {k: v for k, v in run_meta.items() if not k.endswith("_version")}  # the store adds versions
    session = Probe(model, run_dir, config=probe, meta=probe_meta) if probe is not None else None
    try:
        return _loop(model, optimizer, cfg, batches, val_batches, device, start, run_dir,
                     [*observers, session] if session else list(observers), callback)
    finally:
        if session is not None:
            session.close()


def _loop(model: Transformer, optimizer: torch.optim.Optimizer, cfg: TrainConfig, batches: Batches,
          val_batches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device, start: int,
          run_dir: Path | None, observers: Sequence[StepObserver],
          callback: Callable[[StepInfo], None] | None) -> TrainResult:

    fwd = torch.compile(model) if cfg.compile else model
    params = [p for p in model.parameters() if p.requires_grad]
    tokens_per_step = cfg.batch_size * cfg.seq_len
    history: list[StepInfo] = []
    model.train()
    t_last = time.perf_counter()
    for step in range(start + 1, cfg.steps + 1):
        for g in optimizer.param_groups:
            g["lr"] = cfg.lr * lr_factor(step, cfg)
        for o in observers:
            o.begin_step(step)
        x, y = (t.to(device, non_blocking=True) for t in batches.train(step))
        with _autocast(device):
            loss = fwd(x, y).loss
        loss.backward()
        for o in observers:
            o.after_backward(step)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        clip_gate_grad_(model, cfg.gate_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        loss_value = loss.item()
        now = time.perf_counter()
        info = StepInfo(step, loss_value, optimizer.param_groups[0]["lr"], float(grad_norm),
                        step * tokens_per_step, tokens_per_step / max(now - t_last, 1e-9))
        t_last = now
        last = step == cfg.steps
        if (cfg.eval_every and step % cfg.eval_every == 0) or last:
            info.val_loss = evaluate(fwd, val_batches, device)
            log.info("step %d: loss %.4f, val loss %.4f", step, loss_value, info.val_loss)
        for o in observers:
            o.end_step(info)
        history.append(info)
        if callback is not None:
            callback(info)
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"non-finite loss {loss_value} at step {step}")
        if run_dir is not None and ((cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or last):
            _save(model, optimizer, run_dir, step)
            t_last = time.perf_counter()  # checkpoint time is not training throughput
    model.eval()
    return TrainResult(model, run_dir, max(start, cfg.steps), history)


def _save(model: Transformer, optimizer: torch.optim.Optimizer, run_dir: Path, step: int) -> None:
    state = {"step": step, "optimizer": optimizer.state_dict()}
    save_checkpoint(model, run_dir / "checkpoints" / f"step_{step:06d}", step=step,
                    extra_files={TRAINER_STATE: state})


def _restore(model: Transformer, optimizer: torch.optim.Optimizer, ckpt: Path, device: torch.device) -> int:
    assign_weights(model, load_state(ckpt), str(ckpt))
    state = torch.load(ckpt / TRAINER_STATE, map_location=device, weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"])
