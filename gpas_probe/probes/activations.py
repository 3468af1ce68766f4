"""Activation statistics at the residual-stream sites, forward (the activation) and backward (the
gradient of the loss with respect to it), over the positions a token mask keeps:

- ``var``: mean over tokens of the population variance over the hidden dimension;
- ``rms``: sqrt of the mean of squares over all elements; ``absmax``: the largest ``|x|``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from gpas_probe.model.hooks import ProbedLayer
from gpas_probe.probes.accumulator import MAX, Key
from gpas_probe.probes.config import ProbeConfig
from gpas_probe.probes.family import Emit, StatFamily, div, nan_sqrt
from gpas_probe.probes.recording import Recording
from gpas_probe.probes.tokens import TokenRows

#: The accumulated fields of one (layer, site, direction): kept tokens, the sum over them of
#: ``sum_h (x - m)^2`` (``m`` the token's mean), the sum of ``m^2``, and the largest ``|x|``.
FIELDS = ("n", "dev_sq", "mean_sq", "absmax")


def token_blocks(rec: Recording, name: str, rows: TokenRows, entries: list[tuple[Key, int]]) -> None:
    """Accumulate the :data:`FIELDS` of each ``(key, row)`` of ``entries`` from the pass's ``rows``, as
    four blocks named ``(name, field)``; ``sum x^2 = dev_sq + hidden * mean_sq`` (a token's deviations
    sum to zero), so the squares need no field of their own."""
    if not entries:
        return
    keys, at = [k for k, _ in entries], rows.index([r for _, r in entries])
    s = rows.summary()
    for field, values in (("n", rows.counts(len(keys))), ("dev_sq", s.dev_sq.index_select(0, at)),
                          ("mean_sq", s.mean_sq.index_select(0, at))):
        rec.acc.add_block((name, field), [k + (field,) for k in keys], values)
    rec.acc.add_block((name, "absmax"), [k + ("absmax",) for k in keys], s.absmax.index_select(0, at), MAX)


class ActivationStats(StatFamily):
    """var, rms, absmax of residual-stream sites, forward (activation) and backward (its gradient)."""

    name = "activations"

    def __init__(self, blocks: Sequence[ProbedLayer], config: ProbeConfig) -> None:
        self.blocks = blocks
        self.sites = config.sites
        self.fwd, self.bwd = "fwd" in config.directions, "bwd" in config.directions
        self.hidden: dict[tuple[int, str], int] = {}  # host values: no need to accumulate them
        self.grad_scale = 1.0
        self._entries: list[tuple[Key, int]] = []  # (key, row) of the pass under way

    def arm(self, rec: Recording) -> None:
        self.grad_scale = rec.grad_scale
        self._entries = []
        for block in self.blocks:
            for site in self.sites:
                rec.on_forward(getattr(block, f"hook_{site}"),
                               lambda x, layer=block.layer, site=site: self._forward(rec, layer, site, x))
        rec.on_pass_end(lambda rows: self._pass_end(rec, rows))

    def _forward(self, rec: Recording, layer: int, site: str, x: torch.Tensor) -> None:
        self.hidden[(layer, site)] = x.shape[-1]
        if self.fwd:
            self._add(rec, (layer, site, "fwd"), x)
        if self.bwd and x.requires_grad:  # unscaled: rows apply a distributed rank's grad_scale
            rec.on_grad(x, lambda g: self._add(rec, (layer, site, "bwd"), g))

    def _add(self, rec: Recording, key: Key, x: torch.Tensor) -> None:
        row = rec.token_row(x, forward=key[2] == "fwd")  # first: it may end the pass before this one
        self._entries.append((key, row))

    def _pass_end(self, rec: Recording, rows: TokenRows) -> None:
        entries, self._entries = self._entries, []
        token_blocks(rec, self.name, rows, entries)

    def first_non_finite(self, values: Mapping[Key, float]) -> tuple[int, str, str] | None:
        """The first ``(layer, site, direction)`` whose statistics are not finite: activations in
        forward order, then gradients in backward order (last layer first); None if all are finite."""
        order = [(b.layer, site, "fwd") for b in self.blocks for site in self.sites]
        order += [(b.layer, site, "bwd") for b in reversed(self.blocks) for site in reversed(self.sites)]
        for key in order:
            sums = [values.get(key + (s,)) for s in ("dev_sq", "mean_sq")]
            absmax = values.get(key + ("absmax",))  # -inf: no token kept
            if any(v is not None and not math.isfinite(v) for v in sums) or (
                    absmax is not None and (math.isnan(absmax) or absmax == math.inf)):
                return key  # type: ignore[return-value]
        return None

    def rows(self, values: Mapping[Key, float], info: Mapping[str, Any], emit: Emit) -> None:
        for block in self.blocks:
            for site in self.sites:
                for direction in ("fwd", "bwd"):
                    key = (block.layer, site, direction)
                    if key + ("n",) not in values:
                        continue
                    # gradients are reduced unscaled; a distributed rank's share (grad_scale) applies here
                    scale = self.grad_scale if direction == "bwd" else 1.0
                    n, hidden = values[key + ("n",)], self.hidden[(block.layer, site)]
                    dev_sq, mean_sq = values[key + ("dev_sq",)], values[key + ("mean_sq",)]
                    sq = dev_sq + hidden * mean_sq
                    absmax = values[key + ("absmax",)] if n else math.nan
                    emit(block.layer, site, direction, "var", div(dev_sq, n * hidden) * scale**2)
                    emit(block.layer, site, direction, "rms", nan_sqrt(div(sq, n * hidden)) * scale)
                    emit(block.layer, site, direction, "absmax", absmax * scale)
