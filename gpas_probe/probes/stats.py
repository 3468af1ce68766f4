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
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

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


def _max(a: float, b: float) -> float:
    return math.nan if math.isnan(a) or math.isnan(b) else max(a, b)  # NaN wins, whichever side


def _sqrt(a: float) -> float:
    return math.sqrt(a) if a >= 0 else math.nan  # NaN stays NaN


def _masked(t: torch.Tensor, keep: torch.Tensor | None, fill: float = 0.0) -> torch.Tensor:
    return t if keep is None else torch.where(keep, t, torch.full((), fill, dtype=t.dtype, device=t.device))


def _count(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor | int:
    return x.numel() // x.shape[-1] if keep is None else keep.sum()


class Moments(NamedTuple):
    """Sufficient statistics of var/rms/absmax over the kept tokens of a (B, T, hidden) tensor; all
    add up over passes (``n``, ``dev_sq``, ``mean_sq``) or combine by maximum (``hi``, ``neg_lo``)."""

    n: Number  # tokens
    dev_sq: torch.Tensor  # sum over tokens of sum_h (x - m)^2, m the token's mean
    mean_sq: torch.Tensor  # sum over tokens of m^2
    hi: torch.Tensor  # max x (-inf when no token is kept)
    neg_lo: torch.Tensor  # max -x


def moments(x: torch.Tensor, keep: torch.Tensor | None, scratch: torch.Tensor | None = None) -> Moments:
    """The :class:`Moments` of the kept tokens of ``x`` (B, T, hidden); ``scratch``, a buffer of the
    shape and statistics dtype of ``x``, saves allocating the one activation-sized temporary.

    Two-pass variance (token means, then squared deviations): ``torch.var`` over a short last
    dimension is ~15x slower on CPU, and one pass would cancel when means are large. ``sum x^2 =
    dev_sq + hidden * mean_sq`` (a token's deviations sum to zero), so the squares need no pass of
    their own. On CPU ``sum(-1)`` is 2x faster than ``mean(-1)`` (the deviations come from one
    ``sub`` with ``alpha = 1 / hidden``) and ``amax`` + ``amin`` 1.5x faster than ``aminmax``. Sums
    over elements stay ``torch.sum`` (cascaded: a float32 BLAS dot loses ~1e-4 over millions of
    elements); sums over one value per token may be a dot. Scalar arithmetic is left to the host
    (:meth:`ActivationStats.rows`)."""
    x = x.detach()
    x = x.to(stat_dtype(x))
    sums = x.sum(-1, keepdim=True)
    dev = torch.sub(x, sums, alpha=1 / x.shape[-1], **({} if scratch is None else {"out": scratch})).pow_(2)
    if keep is None:  # whole-tensor reductions: no per-token intermediate
        means = sums.reshape(-1) / x.shape[-1]  # squares of means, not of sums: no earlier overflow
        return Moments(x.numel() // x.shape[-1], dev.sum(), torch.dot(means, means), x.amax(), x.amin().neg())
    return Moments(keep.sum(), _masked(dev.sum(-1), keep).sum(),
                   _masked(sums.squeeze(-1).div(x.shape[-1]).pow(2), keep).sum(),
                   _masked(x.amax(-1), keep, -math.inf).amax(), _masked(x.amin(-1).neg(), keep, -math.inf).amax())


def moment_keys(key: Key) -> Moments:
    """The accumulator keys of the :class:`Moments` of ``key``, field by field."""
    return Moments(*(key + (name,) for name in Moments._fields))


def add_moments(rec: Recording, keys: Moments, x: torch.Tensor, keep: torch.Tensor | None) -> None:
    """Accumulate the :class:`Moments` of ``x`` (B, T, hidden) under ``keys`` (:func:`moment_keys`).

    Several sites often see the very same tensor (``resid_post`` of layer l is ``resid_pre`` of layer
    l + 1; autograd hands one gradient object to both terms of an add): the last tensor reduced in
    each direction is remembered, and a repeat reuses its reductions."""
    slot = ("moments", keys.n[-2])
    last = rec.state.get(slot)
    if last is not None and last[0]() is x and last[1] == x._version and last[2] is keep:
        found = last[3]
    else:
        xs = x.detach()
        xs = xs.to(stat_dtype(xs))
        found = moments(xs, keep, rec.scratch(xs))
        # A weak reference: holding a gradient would stop autograd from accumulating into it in place.
        # When it does, the same object carries new values: its version counter tells.
        rec.state[slot] = (weakref.ref(x), x._version, keep, found)
    acc = rec.acc
    acc.add(keys.n, found.n)
    acc.add(keys.dev_sq, found.dev_sq)
    acc.add(keys.mean_sq, found.mean_sq)
    acc.max(keys.hi, found.hi)
    acc.max(keys.neg_lo, found.neg_lo)


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
        self.keys = {k: moment_keys(k) for b in blocks for site in self.sites for k in
                     ((b.layer, site, "fwd"), (b.layer, site, "bwd"))}
        self.hidden: dict[tuple[int, str], int] = {}  # host values: no need to accumulate them
        self.grad_scale = 1.0

    def arm(self, rec: Recording) -> None:
        self.grad_scale = rec.grad_scale
        for block in self.blocks:
            for site in self.sites:
                rec.on_forward(getattr(block, f"hook_{site}"),
                               lambda x, layer=block.layer, site=site: self._forward(rec, layer, site, x))

    def _forward(self, rec: Recording, layer: int, site: str, x: torch.Tensor) -> None:
        keep = rec.keep(x)
        self.hidden[(layer, site)] = x.shape[-1]
        if self.fwd:
            add_moments(rec, self.keys[(layer, site, "fwd")], x, keep)
        if self.bwd and x.requires_grad:
            keys = self.keys[(layer, site, "bwd")]
            rec.on_grad(x, lambda g: self._backward(rec, keys, keep, g))

    def _backward(self, rec: Recording, keys: Moments, keep: torch.Tensor | None, grad: torch.Tensor) -> None:
        add_moments(rec, keys, grad, keep)  # unscaled: rows apply a distributed rank's grad_scale

    def first_non_finite(self, values: Mapping[Key, float]) -> tuple[int, str, str] | None:
        """The first ``(layer, site, direction)`` whose statistics are not finite: activations in
        forward order, then gradients in backward order (last layer first); None if all are finite."""
        order = [(b.layer, site, "fwd") for b in self.blocks for site in self.sites]
        order += [(b.layer, site, "bwd") for b in reversed(self.blocks) for site in reversed(self.sites)]
        for key in order:
            sums = [values.get(key + (s,)) for s in ("dev_sq", "mean_sq")]
            maxima = [values.get(key + (s,)) for s in ("hi", "neg_lo")]  # -inf: no token kept
            if any(v is not None and not math.isfinite(v) for v in sums) or any(
                    v is not None and (math.isnan(v) or v == math.inf) for v in maxima):
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
                    absmax = _max(values[key + ("hi",)], values[key + ("neg_lo",)]) if n else math.nan
                    emit(block.layer, site, direction, "var", _div(dev_sq, n * hidden) * scale**2)
                    emit(block.layer, site, direction, "rms", _sqrt(_div(sq, n * hidden)) * scale)
                    emit(block.layer, site, direction, "absmax", absmax * scale)


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
        """Per token: the norms of both (``vector_norm`` over the hidden dimension: one pass, no
        temporary) and their dot product (the product in the step's scratch buffer); then sums."""
        dt = torch.promote_types(stat_dtype(s), stat_dtype(b))
        s, b = s.to(dt), b.to(dt)
        norm_s, norm_b = torch.linalg.vector_norm(s, dim=-1), torch.linalg.vector_norm(b, dim=-1)
        cos = torch.mul(s, b, out=rec.scratch(s)).sum(-1).div_((norm_s * norm_b).clamp_min_(torch.finfo(dt).tiny))
        norm_s, norm_b, cos = (_masked(t, keep).reshape(-1) for t in (norm_s, norm_b, cos))
        rec.acc.add(key + ("n",), _count(s, keep))
        rec.acc.add(key + ("sq_s",), torch.dot(norm_s, norm_s))  # one value per token: a dot is accurate enough
        rec.acc.add(key + ("sq_b",), torch.dot(norm_b, norm_b))
        rec.acc.add(key + ("cos",), cos.sum())

    def rows(self, values: Mapping[Key, float], info: Mapping[str, Any], emit: Emit) -> None:
        for block in self.blocks:
            for sub in self.SUBLAYERS:
                key = (block.layer, sub, "fwd")
                if key + ("n",) not in values:
                    continue
                ratio = _sqrt(_div(values[key + ("sq_s",)], values[key + ("sq_b",)]))
                emit(block.layer, sub, "fwd", "shortcut_branch_ratio", ratio)
                emit(block.layer, sub, "fwd", "shortcut_branch_cos", _div(values[key + ("cos",)], values[key + ("n",)]))


def _sum_sq(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
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

    def __init__(self, blocks: Sequence[Block], config: ProbeConfig) -> None:
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
        snapshot = [torch.cat(self._pieces(ps)) for _, _, ps in self.segments]  # copies
        rec.state[self.name] = snapshot
        self._set(rec, "w_sq", snapshot)

    @staticmethod
    def _pieces(params: Sequence[nn.Parameter]) -> list[torch.Tensor]:
        return [local(p).detach().reshape(-1) for p in params]  # views, in the snapshot's order

    def _set(self, rec: Recording, name: str, flats: Sequence[torch.Tensor]) -> None:
        for (layer, part, _), sq in zip(self.segments, _sum_sq(flats), strict=True):
            rec.acc.set((layer, "params", name, part), sq, SUM if part == "sharded" else SAME)

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
                emit(layer, "params", "none", "grad_norm", _sqrt(sum(grads)))
            w_sq = self._total(values, layer, "w_sq")
            if w_sq is None:
                continue
            emit(layer, "params", "none", "weight_norm", _sqrt(w_sq))
            if (d_sq := self._total(values, layer, "d_sq")) is not None:
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
        if not self.gates:
            return
        alpha = torch.stack([gate.alpha.detach().reshape(()) for _, _, gate in self.gates])  # a copy, in one op
        silu = F.silu(alpha)
        columns = {"alpha": alpha.unbind(), "silu_alpha": silu.unbind(), "scale": (1 - silu).unbind()}
        for i, (layer, site, gate) in enumerate(self.gates):
            for stat, column in columns.items():
                rec.acc.set((layer, site, stat), column[i])
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
    statistics, and a missing ``grad_norm`` is computed from every trainable parameter's gradient
    (unless ``grad_norm_given``: the caller always passes it, and no gradient is read for it).
    """

    name = "model"
    STATS = ("loss", "val_loss", "lr", "grad_norm", "tokens")

    def __init__(self, model: nn.Module, grad_norm_given: bool = False) -> None:
        self.model = model
        self.grad_norm_given = grad_norm_given
        self.grad_keys: list[Key] = []

    def arm(self, rec: Recording) -> None:
        if not self.grad_norm_given:
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
