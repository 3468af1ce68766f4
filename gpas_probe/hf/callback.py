"""``GpasProbeCallback``: record a ``transformers.Trainer`` run with the probes.

Importing this module needs transformers (``pip install "gpas-probe[hf]"``; the ``Trainer`` also needs
``accelerate``)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from gpas_probe.extras import require
from gpas_probe.model.adapter import instrument_if_hf
from gpas_probe.probes import Every, Probe, ProbeConfig, Schedule

TrainerCallback = require("transformers", "hf", "for the Trainer callback").TrainerCallback

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
    """

    def __init__(self, out: str | Path, every: int = 100, config: ProbeConfig | None = None, *,
                 schedule: Schedule | None = None, run_id: str | None = None, if_exists: str = "error") -> None:
        if schedule is None and config is None:
            schedule = Every(every)
        self.out, self.config, self.schedule, self.run_id = Path(out), config, schedule, run_id
        self.if_exists = if_exists
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
        self.probe = Probe(model, self.out, config=self.config, schedule=self.schedule, run_id=self.run_id,
                           meta=meta, if_exists="append" if resumed else self.if_exists)
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

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
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
