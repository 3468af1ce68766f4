"""Model-level rows (layer -1, site ``model``): ``loss``, ``val_loss``, ``lr``, ``grad_norm`` (global,
before clipping), ``tokens``, and ``sequences`` where the driver counts them (a profile's windows)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from gpas_probe.probes.accumulator import Key
from gpas_probe.probes.family import Emit, StatFamily, nan_sqrt
from gpas_probe.probes.recording import Recording
from gpas_probe.store.schema import MODEL_LAYER, MODEL_SITE


class ModelStats(StatFamily):
    """Model-level rows (layer -1, site ``model``): loss, val_loss, lr, grad_norm, tokens.

    Values come from the caller (``info``); a loss given as a tensor is copied with the other
    statistics, and a missing ``grad_norm`` is computed from every trainable parameter's gradient
    (unless the driver's ``grad_norm_given``: it always passes it, and no gradient is read for it).
    """

    name = "model"
    STATS = ("loss", "val_loss", "lr", "grad_norm", "tokens", "sequences")

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.grad_keys: list[Key] = []

    def arm(self, rec: Recording) -> None:
        self.grad_keys = []
        if not rec.driver.grad_norm_given:
            self.grad_keys = [rec.watch_grad(p, "sq") for p in self.model.parameters() if p.requires_grad]

    def finish(self, rec: Recording, info: Mapping[str, Any]) -> None:
        loss = info.get("loss")
        if isinstance(loss, torch.Tensor):
            rec.acc.set(("model", "loss"), loss.detach().reshape(()))

    def rows(self, values: Mapping[Key, float], info: Mapping[str, Any], emit: Emit) -> None:
        host = dict(info)
        if ("model", "loss") in values:
            host["loss"] = values[("model", "loss")]
        if host.get("grad_norm") is None:
            grads = [values[k] for k in self.grad_keys if k in values]
            host["grad_norm"] = nan_sqrt(sum(grads)) if grads else None
        self.host_rows(host, emit)

    def host_rows(self, info: Mapping[str, Any], emit: Emit) -> None:
        """The rows of the values given, converted on the host (for steps that are not recorded)."""
        for stat in self.STATS:
            v = info.get(stat)
            if v is not None:
                emit(MODEL_LAYER, MODEL_SITE, "none", stat, float(v.detach() if isinstance(v, torch.Tensor) else v))
