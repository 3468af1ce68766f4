"""One small class per statistic family (DESIGN §6).

A family registers its hooks when a step is armed (:meth:`StatFamily.arm`), may do device work after
the optimizer step (:meth:`StatFamily.finish`), and turns the collected host values into rows
(:meth:`StatFamily.rows`). Definitions, over the positions a token mask keeps:

- ``var``: mean over tokens of the population variance over the hidden dimension;
  ``rms``: sqrt of the mean of squares over all elements; ``absmax``: the largest ``|x|``.
- ``shortcut_branch_ratio``: ``rms(shortcut) / rms(branch)`` over all elements, where the shortcut is
  the residual term and the branch the sub-layer output as they enter the add;
  ``shortcut_branch_cos``: the cosine between the two over the hidden dimension, per token, averaged.
- ``grad_norm``: the L2 norm of the layer's parameter gradients before clipping; ``weight_norm``: of
  the weights the step's forward used; ``update_ratio``: ``||w_after - w_before|| / ||w_before||``.
- gates: ``alpha`` and ``silu_alpha``, ``scale = 1 - silu(alpha)`` as used by the step's forward,
  ``alpha_grad`` before clipping (no row for a frozen gate).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from gpas_probe.distributed import is_sharded, local
from gpas_probe.model.block import Block
from gpas_probe.probes.config import ProbeConfig
from gpas_probe.probes.recording import SAME, SUM, Key, Number, Recording, stat_dtype

Emit = Callable[[int, str, str, str, float], None]  # (layer, site, direction, stat, value)
MODEL_LAYER = -1


def _div(a: float, b: float) -> float:
    if b == 0:
        return math.nan if a == 0 or math.isnan(a) else math.copysign(math.inf, a)
    return a / b


def _sqrt(a: float) -> float:
    return math.sqrt(a) if a >= 0 else math.nan  # NaN stays NaN


def _masked(t: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    return t if keep is None else torch.where(keep, t, torch.zeros((), dtype=t.dtype, device=t.device))


def _count(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor | int:
    return x.numel() // x.shape[-1] if keep is None else keep.sum()


def moments(x: torch.Tensor, keep: torch.Tensor | None) -> tuple[Number, int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(n, hidden, sum of squares, sum over tokens of the variance, absmax)`` of the kept tokens of
    ``x`` (B, T, hidden). The variance is two-pass (mean, then squared deviations): ``torch.var`` over
    a short last dimension is ~15x slower on CPU. ``sum x^2 = sum (x - m)^2 + hidden * sum m^2`` (the
    deviations of each token sum to zero), so the squares need no pass of their own."""
    x = x.detach()
    x = x.to(stat_dtype(x))
    hidden = x.shape[-1]
    mean = x.mean(-1, keepdim=True)
    dev = (x - mean).pow(2)
    if keep is None:  # whole-tensor reductions: no per-token intermediate
        dev_sq, mean_sq = dev.sum(), mean.pow(2).sum()
        lo, hi = torch.aminmax(x)
        absmax = torch.maximum(hi, -lo)
    else:
        dev_sq = _masked(dev.sum(-1), keep).sum()
        mean_sq = _masked(mean.squeeze(-1).pow(2), keep).sum()
        absmax = _masked(x.abs().amax(-1), keep).amax()
    return _count(x, keep), hidden, dev_sq + hidden * mean_sq, dev_sq / hidden, absmax


def add_moments(rec: Recording, key: Key, x: torch.Tensor, keep: torch.Tensor | None) -> None:
    """Accumulate the sufficient statistics of var/rms/absmax of ``x`` (B, T, hidden) under ``key``.

    Several sites often see the very same tensor (``resid_post`` of layer l is ``resid_pre`` of layer
    l + 1; autograd hands one gradient object to both terms of an add): the last tensor reduced in
    each direction is remembered, and a repeat reuses its reductions."""
    slot = ("moments", key[-1])
    last = rec.state.get(slot)
    if last is not None and last[0] is x and last[1] is keep:
        n, hidden, sq, var, absmax = last[2]
    else:
        n, hidden, sq, var, absmax = found = moments(x, keep)
        rec.state[slot] = (x, keep, found)
    rec.acc.add(key + ("n",), n)
    rec.acc.set(key + ("hidden",), hidden)
    rec.acc.add(key + ("sq",), sq)
    rec.acc.add(key + ("var",), var)
    rec.acc.max(key + ("absmax",), absmax)


class StatFamily:
    """Base class: a family does nothing unless it overrides these."""

    name: ClassVar[str]

    def arm(self, rec: Recording) -> None:
        pass

    def finish(self, rec: Recording, info: Mapping[str, Any]) -> None:
        pass

    def rows(self, values: Mapping[Key, float], info: Mapping[str, Any], emit: Emit) -> None:
        pass


class ActivationStats(StatFamily):
    """var, rms, absmax of residual-stream sites, forward (activation) and backward (its gradient)."""

    name = "activations"

    def __init__(self, blocks: Sequence[Block], config: ProbeConfig) -> None:
        self.blocks = blocks
        self.sites = config.sites
        self.fwd, self.bwd = "fwd" in config.directions, "bwd" in config.directions

    def arm(self, rec: Recording) -> None:
        for block in self.blocks:
            for site in self.sites:
                rec.on_forward(getattr(block, f"hook_{site}"),
                               lambda x, layer=block.layer, site=site: self._forward(rec, layer, site, x))

    def _forward(self, rec: Recording, layer: int, site: str, x: torch.Tensor) -> None:
        keep = rec.keep(x)
        if self.fwd:
            add_moments(rec, (layer, site, "fwd"), x, keep)
        if self.bwd and x.requires_grad:
            rec.on_grad(x, lambda g: self._backward(rec, layer, site, keep, g))

    def _backward(self, rec: Recording, layer: int, site: str, keep: torch.Tensor | None, grad: torch.Tensor) -> None:
        if rec.grad_scale != 1.0:  # a rank's share of the global loss's gradient
            grad = grad * rec.grad_scale
        add_moments(rec, (layer, site, "bwd"), grad, keep)

    def first_non_finite(self, values: Mapping[Key, float]) -> tuple[int, str, str] | None:
        """The first ``(layer, site, direction)`` whose statistics are not finite: activations in
        forward order, then gradients in backward order (last layer first); None if all are finite."""
        order = [(b.layer, site, "fwd") for b in self.blocks for site in self.sites]
        order += [(b.layer, site, "bwd") for b in reversed(self.blocks) for site in reversed(self.sites)]
        for key in order:
            stats = [values.get(key + (s,)) for s in ("sq", "var", "absmax")]
            if any(v is not None and not math.isfinite(v) for v in stats):
                return key  # type: ignore[return-value]
        return None

    def rows(self, values: Mapping[Key, float], info: Mapping[str, Any], emit: Emit) -> None:
        for block in self.blocks:
            for site in self.sites:
                for direction in ("fwd", "bwd"):
                    key = (block.layer, site, direction)
                    if key + ("n",) not in values:
                        continue
                    n, hidden = values[key + ("n",)], values[key + ("hidden",)]
                    emit(block.layer, site, direction, "var", _div(values[key + ("var",)], n))
                    emit(block.layer, site, direction, "rms", _sqrt(_div(values[key + ("sq",)], n * hidden)))
                    emit(block.layer, site, direction, "absmax", values[key + ("absmax",)])


class ShortcutBranchStats(StatFamily):
    """Per sub-layer: how much the residual shortcut outweighs the branch entering the same add."""

    name = "ratios"
    SUBLAYERS = ("attn", "mlp")

    def __init__(self, blocks: Sequence[Block], config: ProbeConfig) -> None:
        self.blocks = blocks

    def arm(self, rec: Recording) -> None:
        for block in self.blocks:
            for sub in self.SUBLAYERS:
                pending: dict[str, torch.Tensor] = {}  # the first of the pair seen in this forward
                for role, site in (("shortcut", f"{sub}_shortcut"), ("branch", f"{sub}_out")):
                    rec.on_forward(getattr(block, f"hook_{site}"),
                                   lambda x, layer=block.layer, sub=sub, role=role, pending=pending:
                                   self._seen(rec, layer, sub, role, pending, x))

    def _seen(self, rec: Recording, layer: int, sub: str, role: str, pending: dict[str, torch.Tensor],
              x: torch.Tensor) -> None:
        other = "branch" if role == "shortcut" else "shortcut"
        if other not in pending:
            pending[role] = x
            return
        y = pending.pop(other)
        shortcut, branch = (x, y) if role == "shortcut" else (y, x)
        self._add(rec, (layer, sub, "fwd"), shortcut.detach(), branch.detach(), rec.keep(x))

    @staticmethod
    def _add(rec: Recording, key: Key, s: torch.Tensor, b: torch.Tensor, keep: torch.Tensor | None) -> None:
        dt = torch.promote_types(stat_dtype(s), stat_dtype(b))
        s, b = s.to(dt), b.to(dt)
        sq_s, sq_b, dot = s.pow(2).sum(-1), b.pow(2).sum(-1), (s * b).sum(-1)
        cos = dot / (sq_s * sq_b).sqrt().clamp_min(torch.finfo(dt).tiny)
        rec.acc.add(key + ("n",), _count(s, keep))
        rec.acc.add(key + ("sq_s",), _masked(sq_s, keep).sum())
        rec.acc.add(key + ("sq_b",), _masked(sq_b, keep).sum())
        rec.acc.add(key + ("cos",), _masked(cos, keep).sum())

    def rows(self, values: Mapping[Key, float], info: Mapping[str, Any], emit: Emit) -> None:
        for block in self.blocks:
            for sub in self.SUBLAYERS:
                key = (block.layer, sub, "fwd")
                if key + ("n",) not in values:
                    continue
                ratio = _sqrt(_div(values[key + ("sq_s",)], values[key + ("sq_b",)]))
                emit(block.layer, sub, "fwd", "shortcut_branch_ratio", ratio)
                emit(block.layer, sub, "fwd", "shortcut_branch_cos", _div(values[key + ("cos",)], values[key + ("n",)]))


def _sum_sq(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum of squares of every element of ``tensors`` (at least float32): one foreach norm per dtype."""
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.dtype, []).append(t.detach())
    total = torch.zeros(())
    for ts in groups.values():
        total = total + torch.stack(torch._foreach_norm(ts, 2, dtype=stat_dtype(ts[0]))).square().sum()
    return total


def set_sum_sq(rec: Recording, key: Key, tensors: Sequence[torch.Tensor], sharded: Sequence[bool]) -> None:
    """Keep the squared norm of ``tensors`` (local parts) under ``key + ("sharded",)`` (FSDP shards,
    summed over ranks) and ``key + ("whole",)`` (whole tensors, the same on every rank)."""
    parts = {"sharded": [t for t, s in zip(tensors, sharded, strict=True) if s],
             "whole": [t for t, s in zip(tensors, sharded, strict=True) if not s]}
    for name, ts in parts.items():
        if ts:
            rec.acc.set(key + (name,), _sum_sq(ts), SUM if name == "sharded" else SAME)


def get_sum_sq(values: Mapping[Key, float], key: Key) -> float | None:
    found = [values[k] for name in ("sharded", "whole") if (k := key + (name,)) in values]
    return sum(found) if found else None


class ParamStats(StatFamily):
    """Per decoder layer, over its trainable parameters: gradient norm, weight norm, update ratio.

    Arming copies the layer's weights (this rank's shards under FSDP) to measure the update, so a
    recorded step holds one extra copy of the decoder's parameters until it ends.
    """

    name = "params"

    def __init__(self, blocks: Sequence[Block], config: ProbeConfig) -> None:
        self.blocks = blocks
        self.layers: list[tuple[int, list[nn.Parameter]]] = []
        self.grad_keys: dict[int, list[Key]] = {}

    def arm(self, rec: Recording) -> None:
        # parameters are looked up on every arm, so replaced parameter objects are followed
        self.layers = [(b.layer, [p for p in b.parameters() if p.requires_grad]) for b in self.blocks]
        for layer, params in self.layers:
            snapshot = [local(p).detach().clone() for p in params]
            rec.state[(self.name, layer)] = snapshot
            set_sum_sq(rec, (layer, "params", "w_sq"), snapshot, [is_sharded(p) for p in params])
            self.grad_keys[layer] = [rec.watch_grad(p, "sq") for p in params]

    def finish(self, rec: Recording, info: Mapping[str, Any]) -> None:
        for layer, params in self.layers:
            snapshot = rec.state.pop((self.name, layer))
            now = [local(p).detach() for p in params]
            if all(p.dtype == s.dtype == stat_dtype(p) for p, s in zip(now, snapshot, strict=True)):
                deltas = list(torch._foreach_sub(now, snapshot))
            else:
                deltas = [p.to(stat_dtype(p)) - s.to(stat_dtype(s)) for p, s in zip(now, snapshot, strict=True)]
            set_sum_sq(rec, (layer, "params", "d_sq"), deltas, [is_sharded(p) for p in params])

    def rows(self, values: Mapping[Key, float], info: Mapping[str, Any], emit: Emit) -> None:
        for layer, _params in self.layers:
            grads = [values[k] for k in self.grad_keys.get(layer, ()) if k in values]
            if grads:
                emit(layer, "params", "none", "grad_norm", _sqrt(sum(grads)))
            w_sq = get_sum_sq(values, (layer, "params", "w_sq"))
            if w_sq is None:
                continue
            emit(layer, "params", "none", "weight_norm", _sqrt(w_sq))
            if (d_sq := get_sum_sq(values, (layer, "params", "d_sq"))) is not None:
                emit(layer, "params", "none", "update_ratio", _div(_sqrt(d_sq), _sqrt(w_sq)))


def gate_sites(block: Block) -> list[tuple[str, nn.Module]]:
    """The layer's gates with their site names: ``gpas`` when shared, ``gpas_attn``/``gpas_mlp`` when not."""
    gates = block.gates()
    names = ["gpas"] if len(gates) == 1 else ["gpas_attn", "gpas_mlp"][: len(gates)]
    return list(zip(names, gates, strict=True))


class GateStats(StatFamily):
    """GPAS gates: alpha, silu(alpha), the scale 1 - silu(alpha), and alpha's gradient."""

    name = "gpas"

    def __init__(self, blocks: Sequence[Block], config: ProbeConfig) -> None:
        self.gates = [(b.layer, site, g) for b in blocks for site, g in gate_sites(b)]
        self.grad_keys: dict[tuple[int, str], Key] = {}

    def arm(self, rec: Recording) -> None:
        for layer, site, gate in self.gates:
            alpha = gate.alpha.detach().clone()
            silu = F.silu(alpha)
            rec.acc.set((layer, site, "alpha"), alpha)
            rec.acc.set((layer, site, "silu_alpha"), silu)
            rec.acc.set((layer, site, "scale"), 1 - silu)
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


class ModelStats(StatFamily):
    """Model-level rows (layer -1, site ``model``): loss, val_loss, lr, grad_norm, tokens.

    Values come from the caller (``info``); a loss given as a tensor is copied with the other
    statistics, and a missing ``grad_norm`` is computed from every trainable parameter's gradient.
    """

    name = "model"
    STATS = ("loss", "val_loss", "lr", "grad_norm", "tokens")

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.grad_keys: list[Key] = []

    def arm(self, rec: Recording) -> None:
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
            host["grad_norm"] = _sqrt(sum(grads)) if grads else None
        self.host_rows(host, emit)

    def host_rows(self, info: Mapping[str, Any], emit: Emit) -> None:
        """The rows of the values given, converted on the host (for steps that are not recorded)."""
        for stat in self.STATS:
            v = info.get(stat)
            if v is not None:
                emit(MODEL_LAYER, "model", "none", stat, float(v))
