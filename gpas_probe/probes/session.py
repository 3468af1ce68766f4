"""The probe session: arms hooks on scheduled steps, turns what they gather into rows, owns the writer.

Two ways to drive it:

- the training loop's observer protocol (:func:`gpas_probe.train` calls these):
  ``begin_step(step)`` before the forward of update ``step``, ``after_backward(step)``,
  ``end_step(info)`` after ``optimizer.step()``;
- a user's own loop, told about a step only after it happened::

      probe = attach(model, out="runs/x", every=100)
      for step in range(1, n + 1):
          ...forward, backward, optimizer.step(), zero_grad()...
          probe.step(step, loss=loss)
      probe.close()

  ``step(s)`` finishes step ``s`` and arms the hooks for step ``s + 1`` when the schedule records it.

What the caller promises, and the process it runs in, is its :class:`~gpas_probe.probes.driver.Driver`.
In a distributed run (:meth:`Driver.for_training` under ``--dist``), every rank records its own tokens,
the statistics of all ranks are reduced before they are copied to the host, parameter gradients are
read in ``after_backward`` (once DDP/FSDP have reduced them, before clipping), and only the first rank
stores rows.

An armed step owns every hook it registers and removes them when it ends; an unrecorded step runs
with no hook on the model. Forward passes with gradients disabled (evaluation) are not recorded, and
several forward/backward passes in one step (gradient accumulation) are pooled. Closing the session
(or leaving its ``with`` block, also by an exception) removes every hook and writes what was recorded.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from gpas_probe.lock import RunLock
from gpas_probe.loggers import LogConfig, Loggers, LogTo, is_rank_zero, open_loggers
from gpas_probe.model.adapter import instrument_if_hf
from gpas_probe.model.hooks import ProbedLayer, probed_layers
from gpas_probe.probes.accumulator import Key
from gpas_probe.probes.activations import ActivationStats
from gpas_probe.probes.config import ProbeConfig
from gpas_probe.probes.driver import Driver
from gpas_probe.probes.family import StatFamily
from gpas_probe.probes.gates import GateStats
from gpas_probe.probes.model_level import ModelStats
from gpas_probe.probes.outliers import OutlierStats
from gpas_probe.probes.params import ParamStats
from gpas_probe.probes.ratios import ShortcutBranchStats
from gpas_probe.probes.recording import Recording
from gpas_probe.probes.schedules import Every, Schedule, make_schedule
from gpas_probe.store import (
    IF_EXISTS,
    PROBES_DIR,
    MemoryWriter,
    NullWriter,
    ProbeWriter,
    open_probe_folder,
    truncate_after,
)

log = logging.getLogger(__name__)


def find_blocks(model: nn.Module) -> list[ProbedLayer]:
    """The decoder layers of ``model`` (also inside wrappers such as DDP or torch.compile), by depth."""
    blocks = probed_layers(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no decoder layers to probe (gpas_probe Block or ProbedLayer)")
    return blocks


def _model_config(model: nn.Module) -> dict[str, Any] | None:
    config = getattr(model, "config", None) or getattr(getattr(model, "module", None), "config", None)
    to_dict = getattr(config, "to_dict", None)
    return to_dict() if callable(to_dict) else None


class Probe:
    """Records the statistics of :class:`ProbeConfig` on the steps its schedule picks.

    ``out`` is the run directory (rows go to ``out/probes/``); without it rows stay in memory and
    :meth:`frame` returns them. ``schedule`` (a callable ``step -> bool``) overrides the config's.
    ``meta`` (the caller's model/train configs) is stored with the rows. ``optimizer`` lets
    :meth:`step` read the learning rate. ``model`` may be given later with :meth:`bind`. ``driver``
    (:class:`~gpas_probe.probes.driver.Driver`) declares who drives the probe; the default is a user's
    own loop in one process. ``log_to`` (names, a comma list or a :class:`~gpas_probe.loggers.LogConfig`)
    sends each recorded step's summary to TensorBoard, W&B or MLflow too, from the process that writes
    rows (rank 0 of a ``torch.distributed`` group).
    """

    def __init__(self, model: nn.Module | None = None, out: str | Path | None = None, *,
                 config: ProbeConfig | None = None, schedule: Schedule | None = None, run_id: str | None = None,
                 meta: dict[str, Any] | None = None, optimizer: torch.optim.Optimizer | None = None,
                 driver: Driver | None = None, if_exists: str = "error", log_to: LogTo = None) -> None:
        self.config = config or ProbeConfig()
        self.schedule = schedule or make_schedule(self.config)
        self.out = Path(out) if out is not None else None
        self.run_id = run_id or (self.out.resolve().name if self.out is not None else "run")
        self.optimizer = optimizer
        self._meta = dict(meta or {})
        self._families: list[StatFamily] = []
        self._model_stats: ModelStats | None = None
        self._writer: ProbeWriter | MemoryWriter | NullWriter | None = None
        self.driver = driver or Driver()
        if if_exists not in IF_EXISTS:
            raise ValueError(f"unknown if_exists {if_exists!r}; choose one of {', '.join(IF_EXISTS)}")
        self.if_exists = if_exists
        self._lock: RunLock | None = None
        self._log = LogConfig.of(log_to)
        if self._log is not None:
            self._log.require()  # a missing extra fails here, before anything is opened
        self._loggers: Loggers | None = None
        self._trim = False  # rows of a folder appended to are trimmed at the first step recorded
        self._activations: ActivationStats | None = None
        self._last: tuple[int, dict[Key, float]] | None = None  # the last recorded step's values
        self._rec: Recording | None = None
        self._exclude: torch.Tensor | None = None
        self._tokens: torch.Tensor | None = None
        self.model: nn.Module | None = None
        self.closed = False
        if model is not None:
            self.bind(model)

    # -- setup ---------------------------------------------------------------------------------
    def bind(self, model: nn.Module) -> Probe:
        """Attach to ``model`` (once); nothing is hooked until a step is armed."""
        if self.model is not None:
            raise RuntimeError("this probe is already bound to a model")
        self._check_open()
        instrument_if_hf(model)  # a Hugging Face model gets its probed layers (gpas_probe.hf)
        blocks = find_blocks(model)
        cfg = self.config
        makers = {"activations": ActivationStats, "outliers": OutlierStats, "ratios": ShortcutBranchStats,
                  "params": ParamStats, "gpas": GateStats}
        self._families = [makers[name](blocks, cfg) for name in cfg.stats if name in makers]
        self._activations = next((f for f in self._families if isinstance(f, ActivationStats)), None)
        if "model" in cfg.stats:
            self._model_stats = ModelStats(model)
            self._families.append(self._model_stats)
        self.model = model
        meta = {"probe_config": cfg.to_dict(), **self._meta}
        if "model_config" not in meta and (mc := _model_config(model)) is not None:
            meta["model_config"] = mc
        if self.driver.write and self.out is not None and not self.driver.owns_folder:
            self._open_folder()
        if self._log is not None and self.driver.write and is_rank_zero():
            try:  # after the folder's checks, before its first file
                self._loggers = open_loggers(self._log, depth=len(blocks), out=self.out, run_id=self.run_id,
                                             meta={"run_id": self.run_id, **meta})
            except BaseException:
                self.close()
                raise
        if not self.driver.write:
            self._writer = NullWriter()
        elif self.out is not None:
            self._writer = ProbeWriter(self.out / PROBES_DIR, self.run_id, meta,
                                       flush_rows=cfg.flush_rows, flush_steps=cfg.flush_steps,
                                       flush_seconds=cfg.flush_seconds)
        else:
            self._writer = MemoryWriter(self.run_id)
        return self

    def _open_folder(self) -> None:
        """Lock the run folder for this probe's life and apply ``if_exists`` to rows already there."""
        assert self.out is not None
        self._lock = RunLock(self.out, "attach").acquire()
        try:
            self._trim = open_probe_folder(self.out / PROBES_DIR, self.if_exists)
        except BaseException:
            self._lock.release()
            self._lock = None
            raise
        self._lock.announce()

    def set_exclude_mask(self, exclude: torch.Tensor | None) -> None:
        """Positions to leave out of the activation statistics from now on: a (batch, seq) boolean
        tensor, True = excluded (e.g. ``labels == -100`` for padding); None includes every position."""
        if exclude is not None and (exclude.dim() != 2 or exclude.dtype not in (torch.bool, torch.uint8)):
            raise ValueError(f"the exclude mask must be a (batch, seq) boolean tensor, got {exclude.dtype} "
                             f"of shape {tuple(exclude.shape)}")
        self._exclude = exclude
        if self._rec is not None:
            self._rec.set_exclude(exclude)

    def set_tokens(self, input_ids: torch.Tensor | None) -> None:
        """The (batch, seq) input ids of the forward passes from now on, so that the ``outliers`` family
        can say which token the largest activation sits at (``absmax_token``); None: unknown."""
        self._tokens = input_ids
        if self._rec is not None:
            self._rec.tokens = input_ids

    # -- state ---------------------------------------------------------------------------------
    @property
    def recording_step(self) -> int | None:
        """The step whose hooks are armed, or None."""
        return self._rec.step if self._rec is not None else None

    @property
    def num_hooks(self) -> int:
        """Hooks registered right now (0 between recorded steps)."""
        return self._rec.num_hooks if self._rec is not None else 0

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("this probe is closed")

    def _check_bound(self) -> None:
        self._check_open()
        if self.model is None:
            raise RuntimeError("this probe has no model yet; pass one or call bind(model)")

    def _arm(self, step: int) -> None:
        self._disarm()
        rec = Recording(step, self.driver, self.config.skip_first_position, self._exclude, self._tokens)
        self._rec = rec
        try:
            for family in self._families:
                family.arm(rec)
        except BaseException:
            self._disarm()
            raise

    def _disarm(self) -> None:
        if self._rec is not None:
            self._rec.close()
            self._rec = None

    def _emit(self, step: int) -> Any:
        assert self._writer is not None
        return functools.partial(self._writer.add, step)  # (layer, site, direction, stat, value)

    def _complete(self, step: int, info: dict[str, Any]) -> None:
        """Finish the armed step as ``step`` (rows of every family), or write the model rows of an
        unrecorded step: every value given as a host number (or a CPU tensor), so loss and learning
        rate curves have every step; an accelerator tensor is read on recorded steps only (reading it
        would wait for the device)."""
        if self._trim:  # appending: the rows of this step and later ones, recorded before, go
            self._trim = False
            truncate_after(self.out / PROBES_DIR, step - 1)  # type: ignore[operator]
        rec = self._rec
        if rec is None:
            if self._model_stats is not None:
                host = {k: v for k, v in info.items()
                        if v is not None and not (isinstance(v, torch.Tensor) and v.device.type != "cpu")}
                if host:
                    self._model_stats.host_rows(host, self._emit(step))
                    self._writer.end_step(recorded=False)  # type: ignore[union-attr]
            return
        if rec.step != step:
            log.warning("probe armed for step %d was told step %d ended; recording it as step %d",
                        rec.step, step, step)
        if rec.grads_pending:
            log.warning("step %d: parameter gradients were not read (grads_at_backward_end, but after_backward "
                        "was not called): no gradient norms for this step", step)
        try:
            rec.end_pass()
            for family in self._families:
                family.finish(rec, info)
            values = rec.acc.collect(self.driver.all_reduce)
        finally:
            self._disarm()
        self._last = (step, values)
        emit = self._emit(step) if self._loggers is None else self._loggers.tee(self._emit(step))
        for family in self._families:
            family.rows(values, info, emit)
        self._writer.end_step()  # type: ignore[union-attr]
        if self._loggers is not None:  # the same host rows, summarised: nothing more is read from the device
            self._loggers.end_step(step)

    # -- observer protocol (gpas_probe.train) ---------------------------------------------------
    def begin_step(self, step: int) -> None:
        """Before the forward of update ``step``: arm the hooks if the schedule records it."""
        self._check_bound()
        if self._rec is not None and self._rec.step == step:
            return
        if self.schedule(step):
            self._arm(step)
        else:
            self._disarm()

    def after_backward(self, step: int) -> None:
        """After the backward pass, before clipping: parameter gradients are read here when the driver
        reads them at the backward's end; otherwise hooks have read them already."""
        if self._rec is not None and self.driver.reads_grads_at_end:
            self._rec.capture_grads()

    def end_step(self, info: Any) -> None:
        """After ``optimizer.step()``: ``info`` is a :class:`gpas_probe.training.StepInfo` (or any object
        with its ``step``, ``loss``, ``val_loss``, ``lr``, ``grad_norm`` and ``tokens`` attributes)."""
        self._check_bound()
        values = {k: getattr(info, k, None) for k in ModelStats.STATS}
        self._complete(info.step, values)

    # -- drop-in API -----------------------------------------------------------------------------
    def start(self, step: int = 1) -> Probe:
        """Arm the hooks for the first step ``step`` if the schedule records it (:func:`attach` does)."""
        self._check_bound()
        if self.schedule(step):
            self._arm(step)
        return self

    def step(self, step: int, *, loss: float | torch.Tensor | None = None, lr: float | None = None,
             grad_norm: float | torch.Tensor | None = None, tokens: int | None = None,
             val_loss: float | None = None) -> None:
        """Call after ``optimizer.step()`` of update ``step``: records it if it was armed, then arms
        step ``step + 1`` if the schedule records it. ``lr`` defaults to the optimizer's (first group);
        ``grad_norm`` (before clipping) to the norm of all trainable parameters' gradients."""
        self._check_bound()
        if lr is None and self.optimizer is not None:
            lr = float(self.optimizer.param_groups[0]["lr"])
        loss, grad_norm = (v.detach() if isinstance(v, torch.Tensor) else v for v in (loss, grad_norm))
        info = {"loss": loss, "val_loss": val_loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens}
        self._complete(step, info)
        if self.schedule(step + 1):
            self._arm(step + 1)

    # -- output ----------------------------------------------------------------------------------
    @property
    def last_recorded_step(self) -> int | None:
        """The last step whose statistics were recorded (None before the first)."""
        return self._last[0] if self._last is not None else None

    def first_non_finite(self) -> tuple[int, str, str] | None:
        """Where the last recorded step first went non-finite: ``(layer, site, direction)`` of the
        first activation statistic that is NaN or infinite, in forward order (then gradients, in
        backward order); None when all are finite or activations are not recorded."""
        if self._last is None or self._activations is None:
            return None
        return self._activations.first_non_finite(self._last[1])

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def frame(self) -> pd.DataFrame:
        """Every row recorded so far, as a DataFrame of the store's schema."""
        if self._writer is None:
            raise RuntimeError("this probe has no model yet; nothing was recorded")
        return self._writer.frame()

    def close(self) -> None:
        """Remove every hook (an armed, unfinished step is dropped) and write the remaining rows."""
        if self.closed:
            return
        self._disarm()
        self.closed = True
        try:
            if self._writer is not None:
                self._writer.close()
        finally:
            if self._loggers is not None:
                self._loggers.close()  # a logger that fails to close is reported, not raised
            if self._lock is not None:
                self._lock.release()

    def __enter__(self) -> Probe:
        self._check_open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def attach(model: nn.Module, out: str | Path | None = None, *, every: int = 100, schedule: Schedule | None = None,
           config: ProbeConfig | None = None, optimizer: torch.optim.Optimizer | None = None, start: int = 1,
           if_exists: str = "error", **kwargs: Any) -> Probe:
    """A :class:`Probe` for a user's own loop, armed for step ``start``; call :meth:`Probe.step`
    after each optimizer step and :meth:`Probe.close` at the end (or use it in a ``with`` block).

    ``every`` sets the schedule unless ``schedule`` or ``config`` is given. ``out`` is locked until the
    probe closes (a second writer is refused); a folder that already holds probe rows is refused unless
    ``if_exists`` is ``"append"`` (a resumed loop: rows of the steps it records again are replaced, so
    each key stays unique) or ``"overwrite"``. ``log_to`` (e.g. ``"tensorboard,wandb"``) also sends each
    recorded step's summary to those loggers (see :class:`Probe`).
    """
    if schedule is None and config is None:
        schedule = Every(every)
    probe = Probe(model, out, config=config, schedule=schedule, optimizer=optimizer, if_exists=if_exists, **kwargs)
    return probe.start(start)
