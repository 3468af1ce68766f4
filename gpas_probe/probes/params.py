"""Per decoder layer, over its trainable parameters:

- ``grad_norm``: the L2 norm of the layer's parameter gradients before clipping;
- ``weight_norm``: of the weights the step's forward used;
- ``update_ratio``: ``||w_after - w_before|| / ||w_before||``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from gpas_probe.distributed import is_sharded, local
from gpas_probe.model.hooks import ProbedLayer
from gpas_probe.probes.accumulator import SAME, SUM, Key, stat_dtype
from gpas_probe.probes.config import ProbeConfig
from gpas_probe.probes.family import Emit, StatFamily, div, nan_sqrt
from gpas_probe.probes.recording import Recording


def sum_sq(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The sum of squares of each tensor (at least float32): one fused norm per dtype and device."""
    out: list[torch.Tensor | None] = [None] * len(tensors)
    groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.dtype, t.device), []).append(i)
    for idx in groups.values():
        norms = torch._foreach_norm([tensors[i] for i in idx], 2, dtype=stat_dtype(tensors[idx[0]]))
        for i, sq in zip(idx, torch.stack(norms).square().unbind(), strict=True):
            out[i] = sq
    return out  # type: ignore[return-value]


class ParamStats(StatFamily):
    """Per decoder layer, over its trainable parameters: gradient norm, weight norm, update ratio.

    Arming copies each layer's weights (this rank's shards under FSDP) into one flat tensor per
    (layer, sharded or whole) segment to measure the update, so a recorded step holds one extra copy
    of the decoder's parameters until it ends. One ``cat`` per segment and one fused norm over all
    segments cost a fraction of a copy and a norm per parameter.
    """

    name = "params"

    def __init__(self, blocks: Sequence[ProbedLayer], config: ProbeConfig) -> None:
        self.blocks = blocks
        self.layers: list[int] = []
        self.segments: list[tuple[int, str, list[nn.Parameter]]] = []  # (layer, "whole"/"sharded", params)
        self.grad_keys: dict[int, list[Key]] = {}

    def arm(self, rec: Recording) -> None:
        # parameters are looked up on every arm, so replaced parameter objects are followed
        self.layers, self.segments = [], []
        for b in self.blocks:
            params = [p for p in b.parameters() if p.requires_grad]
            self.layers.append(b.layer)
            self.grad_keys[b.layer] = [rec.watch_grad(p, "sq") for p in params]
            for part, sharded in (("whole", False), ("sharded", True)):
                if ps := [p for p in params if is_sharded(p) == sharded]:
                    self.segments.append((b.layer, part, ps))
        if not rec.driver.updates:  # no step will follow: the weight norms only, no copy
            self._set_each(rec, "w_sq")
            return
        snapshot = [torch.cat(self._pieces(ps)) for _, _, ps in self.segments]  # copies
        rec.state[self.name] = snapshot
        self._set(rec, "w_sq", snapshot)

    @staticmethod
    def _pieces(params: Sequence[nn.Parameter]) -> list[torch.Tensor]:
        return [local(p).detach().reshape(-1) for p in params]  # views, in the snapshot's order

    def _set_each(self, rec: Recording, name: str) -> None:
        """The squared norm of each segment from its parameters as they are (one fused norm, no copy)."""
        pieces = [self._pieces(ps) for _, _, ps in self.segments]
        squares = sum_sq([t for ts in pieces for t in ts])
        totals, start = [], 0
        for ts in pieces:
            totals.append(torch.stack(squares[start:start + len(ts)]).sum())
            start += len(ts)
        self._put(rec, name, totals)

    def _set(self, rec: Recording, name: str, flats: Sequence[torch.Tensor]) -> None:
        self._put(rec, name, sum_sq(flats))

    def _put(self, rec: Recording, name: str, squares: Sequence[torch.Tensor]) -> None:
        """One block per kind of segment (whole: every rank holds it; sharded: ranks sum their shards)."""
        for part, reduce in (("whole", SAME), ("sharded", SUM)):
            picked = [(layer, sq) for (layer, p, _), sq in zip(self.segments, squares, strict=True) if p == part]
            if picked:
                rec.acc.set_block((self.name, name, part), [(layer, "params", name, part) for layer, _ in picked],
                                  torch.stack([sq for _, sq in picked]), reduce)

    def finish(self, rec: Recording, info: Mapping[str, Any]) -> None:
        snapshot = rec.state.pop(self.name, None)
        if snapshot is None:
            return
        # The update, computed into the snapshot itself (a private copy): no second copy of the
        # parameters. A snapshot in a narrower dtype is widened one segment at a time.
        for i, ((_, _, ps), before) in enumerate(zip(self.segments, snapshot, strict=True)):
            now = self._pieces(ps)
            if before.dtype == stat_dtype(before) and all(p.dtype == before.dtype for p in now):
                torch._foreach_sub_(list(before.split([p.numel() for p in now])), now)
            else:
                snapshot[i] = torch.cat([p.to(stat_dtype(before)) for p in now]).sub_(before.to(stat_dtype(before)))
        self._set(rec, "d_sq", snapshot)

    @staticmethod
    def _total(values: Mapping[Key, float], layer: int, name: str) -> float | None:
        found = [values[k] for part in ("whole", "sharded") if (k := (layer, "params", name, part)) in values]
        return sum(found) if found else None

    def rows(self, values: Mapping[Key, float], info: Mapping[str, Any], emit: Emit) -> None:
        for layer in self.layers:
            grads = [values[k] for k in self.grad_keys.get(layer, ()) if k in values]
            if grads:
                emit(layer, "params", "none", "grad_norm", nan_sqrt(sum(grads)))
            w_sq = self._total(values, layer, "w_sq")
            if w_sq is None:
                continue
            emit(layer, "params", "none", "weight_norm", nan_sqrt(w_sq))
            if (d_sq := self._total(values, layer, "d_sq")) is not None:
                emit(layer, "params", "none", "update_ratio", div(nan_sqrt(d_sq), nan_sqrt(w_sq)))
