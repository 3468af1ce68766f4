"""``GpasProbeCallback``: record a ``transformers.Trainer`` run with the probes.

Importing this module needs transformers (``pip install "gpas-probe[hf]"``; the ``Trainer`` also needs
``accelerate``)."""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from gpas_probe.extras import require
from gpas_probe.loggers import LogConfig
from gpas_probe.model.adapter import instrument_if_hf
from gpas_probe.probes import Every, Probe, ProbeConfig, Schedule

transformers = require("transformers", "hf", "for the Trainer callback")
TrainerCallback = transformers.TrainerCallback
log = logging.getLogger(__name__)

_TRAINER_FIELDS = ("output_dir", "learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps",
                   "max_steps", "num_train_epochs", "max_grad_norm", "weight_decay", "lr_scheduler_type",
                   "warmup_steps", "seed")


class GpasProbeCallback(TrainerCallback):
    """Records a ``transformers.Trainer`` run with the probes, into ``out/probes/`` in the schema
    of ``gpas-probe train`` (``gpas-probe plot``/``info``/``diagnose`` read it).

    ``every`` sets the schedule (step 1 and every ``every``-th optimizer step) unless ``config``
    (a :class:`~gpas_probe.probes.ProbeConfig`) or ``schedule`` is given. The model is
    instrumented (:func:`gpas_probe.hf.instrument`) when training begins if it is a Hugging Face
    model. Each recorded step writes the probe statistics and, at ``layer=-1``: ``loss`` (the
    training loss of the step, over its gradient-accumulation micro-batches, as the model returned
    it), ``lr`` (the one the optimizer step used), ``grad_norm`` (of all gradients, before clipping),
    ``tokens`` (``state.num_input_tokens_seen`` when the Trainer counts them) and ``val_loss`` when an
    evaluation ran right after the step. Padding (``attention_mask == 0``) is excluded from the
    activation statistics. In a distributed run only the first process records (its own share of
    the batch). ``out`` is locked while training runs; rows already there are refused unless
    ``if_exists`` says otherwise (:func:`gpas_probe.attach`), except when the Trainer resumes from a
    checkpoint: then they are appended to, the steps recorded again replacing theirs.

    Each recorded step's summary (the names of ``--log-to``: ``gpas/var/resid_post/layer_07``,
    ``gpas/model/loss`` ...) is handed to the Trainer's own ``log``, so it lands in ``state.log_history``
    (its ``step`` the recorded step) and wherever ``report_to`` sends the Trainer's logs. The Trainer is
    the one whose callbacks hold this callback, found when training begins (or set ``trainer``);
    ``log_summaries=False`` leaves the Trainer's logs alone. A step's summary is logged once an evaluation
    right after it has run (for its ``val_loss``): when the next step begins, and for the last step with
    the Trainer's final log, before the integrations close.
    """

    def __init__(self, out: str | Path, every: int = 100, config: ProbeConfig | None = None, *,
                 schedule: Schedule | None = None, run_id: str | None = None, if_exists: str = "error",
                 log_summaries: bool = True, trainer: Any = None) -> None:
        if schedule is None and config is None:
            schedule = Every(every)
        self.out, self.config, self.schedule, self.run_id = Path(out), config, schedule, run_id
        self.if_exists = if_exists
        self.log_summaries, self.trainer = log_summaries, trainer
        self.trainer_logging = False
        self.probe: Probe | None = None
        self._handles: list[Any] = []
        self._losses: list[torch.Tensor] = []
        self._summed = False  # micro-batch losses are partial sums (num_items_in_batch given)
        self._lr: float | None = None
        self._pending: dict[str, Any] | None = None

    # -- capture of the loss and the padding mask -------------------------------------------------
    def _before(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self.probe is not None and module.training and torch.is_grad_enabled():
            mask = kwargs.get("attention_mask")
            ok = isinstance(mask, torch.Tensor) and mask.dim() == 2
            self.probe.set_exclude_mask(mask == 0 if ok else None)

    def _after(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return
        loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
        if isinstance(loss, torch.Tensor):
            self._losses.append(loss.detach().float().reshape(()))
            self._summed = kwargs.get("num_items_in_batch") is not None

    def _step_loss(self) -> torch.Tensor | None:
        if not self._losses:
            return None
        total = torch.stack(self._losses).sum()
        return total if self._summed else total / len(self._losses)

    # -- events ----------------------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                       **kwargs: Any) -> None:
        if not state.is_world_process_zero or self.probe is not None:
            return
        if model is None:
            raise ValueError("GpasProbeCallback needs the Trainer's model")
        instrument_if_hf(model)
        meta = {"trainer_args": {k: getattr(args, k, None) for k in _TRAINER_FIELDS}}
        resumed = int(getattr(state, "global_step", 0) or 0) > 0  # resume_from_checkpoint: add to the rows
        if self.log_summaries and self.trainer is None:
            self.trainer = calling_trainer(self)
            if self.trainer is None:
                log.warning("GpasProbeCallback: no Trainer calls this callback; the probe summaries are not "
                            "logged (set callback.trainer = trainer)")
        self.trainer_logging = True
        logs = LogConfig(to=(TrainerLog(self),)) if self.log_summaries and self.trainer is not None else None
        self.probe = Probe(model, self.out, config=self.config, schedule=self.schedule, run_id=self.run_id,
                           meta=meta, if_exists="append" if resumed else self.if_exists, log_to=logs)
        self._handles = [model.register_forward_pre_hook(self._before, with_kwargs=True),
                         model.register_forward_hook(self._after, with_kwargs=True)]

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.probe is None:
            return
        self._finish_pending()
        self._losses.clear()
        self.probe.begin_step(state.global_step + 1)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, optimizer: Any = None,
                              **kwargs: Any) -> None:
        if optimizer is not None:
            self._lr = float(optimizer.param_groups[0]["lr"])

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.probe is None:
            return
        tokens = getattr(state, "num_input_tokens_seen", None) or None
        self._pending = {"step": state.global_step, "loss": self._step_loss(), "lr": self._lr,
                         "grad_norm": None, "tokens": tokens, "val_loss": None}

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, Any] | None = None,
                    **kwargs: Any) -> None:
        if self._pending is not None and self._pending["step"] == state.global_step and metrics:
            if (v := metrics.get("eval_loss")) is not None:
                self._pending["val_loss"] = float(v)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
               **kwargs: Any) -> None:
        if logs and "train_runtime" in logs:  # the Trainer's final log: no evaluation follows the last step
            self._finish_pending()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer_logging = False  # report_to integrations end their runs before this is called
        self.close()

    def _finish_pending(self) -> None:
        if self._pending is not None and self.probe is not None:
            info, self._pending = self._pending, None
            self.probe.end_step(SimpleNamespace(**info))

    def close(self) -> None:
        """Finish the last step, remove every hook and write what was recorded (idempotent)."""
        try:
            self._finish_pending()
        finally:
            for h in self._handles:
                h.remove()
            self._handles.clear()
            if self.probe is not None:
                self.probe.close()
                self.probe = None


class TrainerLog:
    """A probe sink (:class:`gpas_probe.loggers.Sink`) that hands each summary to the Trainer's ``log``,
    while the Trainer's integrations are open."""

    def __init__(self, callback: GpasProbeCallback) -> None:
        self.callback = callback

    def log(self, step: int, metrics: dict[str, float]) -> None:
        trainer = self.callback.trainer
        if trainer is None or not self.callback.trainer_logging:
            log.debug("step %d: the Trainer's logging has ended; its probe summary is in the probe table only", step)
            return
        trainer.log(dict(metrics))

    def close(self) -> None:
        pass


def calling_trainer(callback: TrainerCallback) -> Any:
    """The ``transformers.Trainer`` whose callback handler is calling ``callback`` now, found on the call
    stack (callbacks are not given their Trainer); None if there is none."""
    frame = inspect.currentframe()
    try:
        while frame is not None:
            owner = frame.f_locals.get("self")
            if isinstance(owner, transformers.Trainer) and callback in owner.callback_handler.callbacks:
                return owner
            frame = frame.f_back
    finally:
        del frame
    return None
