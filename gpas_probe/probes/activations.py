"""Activation statistics at the residual-stream sites, forward (the activation) and backward (the
gradient of the loss with respect to it), over the positions a token mask keeps:

- ``var``: mean over tokens of the population variance over the hidden dimension;
- ``rms``: sqrt of the mean of squares over all elements; ``absmax``: the largest ``|x|``.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch

from gpas_probe.model.hooks import ProbedLayer
from gpas_probe.probes.accumulator import Key, Number, stat_dtype
from gpas_probe.probes.config import ProbeConfig
from gpas_probe.probes.family import Emit, StatFamily, div, masked, nan_max, nan_sqrt
from gpas_probe.probes.recording import Recording


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
    return Moments(keep.sum(), masked(dev.sum(-1), keep).sum(),
                   masked(sums.squeeze(-1).div(x.shape[-1]).pow(2), keep).sum(),
                   masked(x.amax(-1), keep, -math.inf).amax(), masked(x.amin(-1).neg(), keep, -math.inf).amax())


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


class ActivationStats(StatFamily):
    """var, rms, absmax of residual-stream sites, forward (activation) and backward (its gradient)."""

    name = "activations"

    def __init__(self, blocks: Sequence[ProbedLayer], config: ProbeConfig) -> None:
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
                    absmax = nan_max(values[key + ("hi",)], values[key + ("neg_lo",)]) if n else math.nan
                    emit(block.layer, site, direction, "var", div(dev_sq, n * hidden) * scale**2)
                    emit(block.layer, site, direction, "rms", nan_sqrt(div(sq, n * hidden)) * scale)
                    emit(block.layer, site, direction, "absmax", absmax * scale)
