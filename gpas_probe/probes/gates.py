"""GPAS gates, per layer: ``alpha`` and ``silu_alpha``, the scale ``1 - silu(alpha)`` as used by the
step's forward, and ``alpha_grad`` before clipping (no row for a frozen gate).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gpas_probe.model.hooks import ProbedLayer
from gpas_probe.probes.accumulator import Key
from gpas_probe.probes.config import ProbeConfig
from gpas_probe.probes.family import Emit, StatFamily
from gpas_probe.probes.recording import Recording


def gate_sites(block: ProbedLayer) -> list[tuple[str, nn.Module]]:
    """The layer's gates with their site names: ``gpas`` when shared, ``gpas_attn``/``gpas_mlp`` when not."""
    gates = block.gates()
    names = ["gpas"] if len(gates) == 1 else ["gpas_attn", "gpas_mlp"][: len(gates)]
    return list(zip(names, gates, strict=True))


class GateStats(StatFamily):
    """GPAS gates: alpha, silu(alpha), the scale 1 - silu(alpha), and alpha's gradient."""

    name = "gpas"

    def __init__(self, blocks: Sequence[ProbedLayer], config: ProbeConfig) -> None:
        self.gates = [(b.layer, site, g) for b in blocks for site, g in gate_sites(b)]
        self.grad_keys: dict[tuple[int, str], Key] = {}

    def arm(self, rec: Recording) -> None:
        if not self.gates:
            return
        alpha = torch.stack([gate.alpha.detach().reshape(()) for _, _, gate in self.gates])  # a copy, in one op
        silu = F.silu(alpha)
        for stat, column in (("alpha", alpha), ("silu_alpha", silu), ("scale", 1 - silu)):
            rec.acc.set_block((self.name, stat), [(layer, site, stat) for layer, site, _ in self.gates], column)
        for layer, site, gate in self.gates:
            if gate.alpha.requires_grad:
                self.grad_keys[(layer, site)] = rec.watch_grad(gate.alpha, "value")

    def rows(self, values: Mapping[Key, float], info: Mapping[str, Any], emit: Emit) -> None:
        for layer, site, _gate in self.gates:
            if (layer, site, "alpha") not in values:
                continue
            for stat in ("alpha", "silu_alpha", "scale"):
                emit(layer, site, "none", stat, values[(layer, site, stat)])
            if (key := self.grad_keys.get((layer, site))) is not None and key in values:
                emit(layer, site, "none", "alpha_grad", values[key])
