"""Sink tokens and massive activations (``fwd``, at every activation site), and the statistics without them.

Trained LLMs put huge values in a few hidden dimensions of a few tokens (the first position, a BOS or
delimiter token) from some layer on. A kept token is an *outlier* when its RMS over the hidden dimension
exceeds ``outlier_factor`` (default 10) times the median kept token's RMS in the same tensor (the
median of each forward pass). Per site:

- ``var_robust``, ``rms_robust``, ``absmax_robust``: ``var``, ``rms``, ``absmax`` over the kept tokens
  that are not outliers (what a diagnosis reads: a handful of tokens cannot dominate them);
- ``outlier_frac``: outlier tokens / kept tokens; ``outlier_var_share``: their share of the sum of
  squared deviations behind ``var`` (how much of ``var`` they carry); ``outlier_pos0_frac``: the
  fraction of sequences whose position 0 is an outlier token;
- ``absmax_dim``, ``absmax_pos``: the hidden dimension and sequence position of the largest ``|x|``
  of any kept token, and ``absmax_token`` the input id there when the driver gave the ids
  (:meth:`~gpas_probe.probes.Probe.set_tokens`); under torchrun, rank 0's coordinates;
- with ``ProbeConfig.intervals``: ``var_robust_lo``, ``var_robust_hi``, the 95% interval of
  ``var_robust`` from per-sequence sums (:mod:`gpas_probe.intervals`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch

from gpas_probe.intervals import ratio_interval
from gpas_probe.model.hooks import ProbedLayer
from gpas_probe.probes.accumulator import Key, stat_dtype
from gpas_probe.probes.config import ProbeConfig
from gpas_probe.probes.family import Emit, StatFamily, div, masked, nan_sqrt
from gpas_probe.probes.recording import Recording

#: The accumulator fields of one site, and the per-sequence sums of the robust variance's interval.
FIELDS = ("n", "n_out", "n_rob", "seqs", "pos0_out", "dev_sq", "dev_sq_out", "dev_sq_rob", "mean_sq_rob",
          "absmax_rob")
SEQ_SUMS = ("m", "sx", "sy", "sxx", "syy", "sxy")


class Tokens(NamedTuple):
    """Per token of a (B, T, hidden) tensor: squared deviations from its mean, summed over the hidden
    dimension, its mean, and its largest ``|x|``."""

    dev_sq: torch.Tensor
    mean: torch.Tensor
    absmax: torch.Tensor


def token_stats(x: torch.Tensor, scratch: torch.Tensor | None = None) -> Tokens:
    """:class:`Tokens` of ``x`` (two-pass: token means, then deviations, in the statistics dtype)."""
    x = x.detach()
    x = x.to(stat_dtype(x))
    sums = x.sum(-1, keepdim=True)
    dev = torch.sub(x, sums, alpha=1 / x.shape[-1], **({} if scratch is None else {"out": scratch})).pow_(2)
    return Tokens(dev.sum(-1), sums.squeeze(-1) / x.shape[-1], torch.maximum(x.amax(-1), x.amin(-1).neg()))


def outlier_mask(mean_square: torch.Tensor, keep: torch.Tensor, factor: float) -> torch.Tensor:
    """Kept tokens whose mean square exceeds ``factor²`` times the median kept token's (no host sync)."""
    median = torch.where(keep, mean_square, torch.full((), math.nan, dtype=mean_square.dtype,
                                                       device=mean_square.device)).nanmedian()
    return keep & (mean_square > factor * factor * median)


def add_sequence_sums(rec: Recording, key: Key, x: torch.Tensor, y: torch.Tensor) -> None:
    """Add the per-sequence sums of a ratio ``Σx / Σy`` (x, y: one value per sequence) under ``key``."""
    x, y = x.double(), y.double()
    for name, value in zip(SEQ_SUMS, (len(x), x.sum(), y.sum(), x.dot(x), y.dot(y), x.dot(y)), strict=True):
        rec.acc.add(key + (name,), value)


def sequence_interval(values: Mapping[Key, float], key: Key) -> tuple[float, float]:
    """The 95% interval of the ratio whose per-sequence sums :func:`add_sequence_sums` kept under ``key``."""
    if key + ("m",) not in values:
        return math.nan, math.nan
    iv = ratio_interval(*(values[key + (name,)] for name in SEQ_SUMS))
    return iv.lo, iv.hi


class OutlierStats(StatFamily):
    """Outlier tokens at the activation sites and the statistics without them (module doc)."""

    name = "outliers"

    def __init__(self, blocks: Sequence[ProbedLayer], config: ProbeConfig) -> None:
        self.blocks = blocks
        self.sites = config.sites if "fwd" in config.directions else ()
        self.factor = config.outlier_factor
        self.intervals = config.intervals
        self.hidden: dict[tuple[int, str], int] = {}

    def arm(self, rec: Recording) -> None:
        for block in self.blocks:
            for site in self.sites:
                rec.on_forward(getattr(block, f"hook_{site}"),
                               lambda x, key=(block.layer, site, "out"): self._forward(rec, key, x))

    def _forward(self, rec: Recording, key: Key, x: torch.Tensor) -> None:
        self.hidden[key[:2]] = hidden = x.shape[-1]
        keep = rec.kept(x)
        xs = x.detach()
        xs = xs.to(stat_dtype(xs))
        t = token_stats(xs, rec.scratch(xs))
        mean_sq = t.mean.square()
        out = outlier_mask(t.dev_sq / hidden + mean_sq, keep, self.factor)
        rob = keep & ~out
        acc = rec.acc
        for name, value in (("n", keep.sum()), ("n_out", out.sum()), ("n_rob", rob.sum()), ("seqs", x.shape[0]),
                            ("pos0_out", out[:, 0].sum()), ("dev_sq", masked(t.dev_sq, keep).sum()),
                            ("dev_sq_out", masked(t.dev_sq, out).sum()), ("dev_sq_rob", masked(t.dev_sq, rob).sum()),
                            ("mean_sq_rob", masked(mean_sq, rob).sum())):
            acc.add(key + (name,), value)
        acc.max(key + ("absmax_rob",), masked(t.absmax, rob, -math.inf).amax())
        flat = masked(t.absmax, keep, -math.inf).reshape(-1)
        i = flat.argmax()
        dim = xs.reshape(-1, hidden)[i].abs().argmax()
        ids = rec.token_ids(x)
        token = ids.reshape(-1)[i] if ids is not None else torch.full((), -1, device=x.device)
        acc.argmax(key + ("loc",), flat[i], (dim, i % x.shape[1], token))
        if self.intervals:
            add_sequence_sums(rec, key + ("var",), masked(t.dev_sq, rob).sum(-1), rob.sum(-1))

    def rows(self, values: Mapping[Key, float], info: Mapping[str, Any], emit: Emit) -> None:
        for block in self.blocks:
            for site in self.sites:
                key = (block.layer, site, "out")
                if key + ("n",) not in values:
                    continue
                v = {name: values[key + (name,)] for name in FIELDS}
                hidden = self.hidden[(block.layer, site)]

                def put(stat: str, value: float, layer: int = block.layer, site: str = site) -> None:
                    emit(layer, site, "fwd", stat, value)

                put("var_robust", div(v["dev_sq_rob"], v["n_rob"] * hidden))
                put("rms_robust", nan_sqrt(div(v["dev_sq_rob"] + hidden * v["mean_sq_rob"], v["n_rob"] * hidden)))
                put("absmax_robust", v["absmax_rob"] if v["n_rob"] else math.nan)
                put("outlier_frac", div(v["n_out"], v["n"]))
                put("outlier_var_share", div(v["dev_sq_out"], v["dev_sq"]))
                put("outlier_pos0_frac", div(v["pos0_out"], v["seqs"]))
                if v["n"]:
                    dim, pos, token = (values[key + ("loc", i)] for i in range(3))
                    put("absmax_dim", dim)
                    put("absmax_pos", pos)
                    if token >= 0:
                        put("absmax_token", token)
                if self.intervals:
                    lo, hi = sequence_interval(values, key + ("var",))
                    put("var_robust_lo", lo / hidden)
                    put("var_robust_hi", hi / hidden)
