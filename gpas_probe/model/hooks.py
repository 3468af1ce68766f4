"""All the probes know about a model: named hook points at the interesting sites of each decoder layer.

A probe-able layer is a :class:`ProbedLayer`: a ``layer`` index, one :class:`HookPoint` per name in
:data:`SITES` (``hook_resid_pre`` ...), its parameters, and its GPAS gates (:meth:`ProbedLayer.gates`).
Our :class:`~gpas_probe.model.block.Block` is one; :mod:`gpas_probe.hf` wraps other models' layers in others.
"""

from __future__ import annotations

import torch
from torch import nn

from gpas_probe.gpas import GPAS

#: Names of the hook points of a layer, in execution order (``attn_shortcut``/``mlp_shortcut`` are the
#: residual terms of each sub-layer, used for the shortcut/branch ratio).
SITES = ("resid_pre", "attn_shortcut", "attn_out", "resid_mid", "mlp_shortcut", "mlp_out", "resid_post")


class HookPoint(nn.Module):
    """A named identity at an interesting site; probes attach forward and tensor hooks here."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class ProbedLayer(nn.Module):
    """A decoder layer the probes can record (module doc)."""

    def __init__(self, layer: int) -> None:
        super().__init__()
        self.layer = layer
        for site in SITES:
            setattr(self, f"hook_{site}", HookPoint())

    def gates(self) -> list[GPAS]:
        """This layer's distinct GPAS modules (none unless a subclass has some)."""
        return []


def probed_layers(model: nn.Module) -> list[ProbedLayer]:
    """The probed layers of ``model`` (also inside wrappers such as DDP or torch.compile), by depth; [] if none."""
    return sorted((m for m in model.modules() if isinstance(m, ProbedLayer)), key=lambda b: b.layer)
