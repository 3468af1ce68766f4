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
from typing import Any

import torch

from gpas_probe.intervals import ratio_interval
from gpas_probe.model.hooks import ProbedLayer
from gpas_probe.probes.accumulator import MAX, Key
from gpas_probe.probes.config import ProbeConfig
from gpas_probe.probes.family import Emit, StatFamily, div, nan_sqrt
from gpas_probe.probes.recording import Recording
from gpas_probe.probes.tokens import TokenRows, masked, masked_sum, repeated

#: The accumulator fields of one site, and the per-sequence sums of the robust variance's interval.
FIELDS = ("n", "n_out", "n_rob", "seqs", "pos0_out", "dev_sq", "dev_sq_out", "dev_sq_rob", "mean_sq_rob",
          "absmax_rob")
SEQ_SUMS = ("m", "sx", "sy", "sxx", "syy", "sxy")


def outlier_masks(rows: TokenRows, at: torch.Tensor, factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(outliers, robust), each (E, B*T): for the forward rows ``at`` (an index tensor), the kept tokens
    whose mean square exceeds ``factor²`` times the median kept token's of the same row, and the other
    kept tokens (no host sync)."""
    threshold = rows.medians().index_select(0, at).mul_(factor * factor)
    out = rows.per_token().mean_square.index_select(0, at) > threshold[:, None]
    if rows.keep_flat is None:
        return out, ~out
    return out & rows.keep_flat, rows.keep_flat & ~out


def add_sequence_blocks(rec: Recording, name: Any, keys: Sequence[Key], x: torch.Tensor, y: torch.Tensor) -> None:
    """Add, for each ``keys[i]``, the per-sequence sums of a ratio ``Σx / Σy`` (``x``, ``y``: (E, B), one
    value per sequence) under ``keys[i] + (s,)`` for ``s`` in :data:`SEQ_SUMS`."""
    x, y = x.double(), y.double()
    m = repeated(x.shape[1], len(keys), x.device)
    for field, value in zip(SEQ_SUMS, (m, x.sum(-1), y.sum(-1), (x * x).sum(-1), (y * y).sum(-1), (x * y).sum(-1)),
                            strict=True):
        rec.acc.add_block((name, field), [k + (field,) for k in keys], value)


def sequence_interval(values: Mapping[Key, float], key: Key) -> tuple[float, float]:
    """The 95% interval of the ratio whose per-sequence sums :func:`add_sequence_blocks` kept under ``key``."""
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
        self._entries: list[tuple[Key, int]] = []

    def arm(self, rec: Recording) -> None:
        if not self.sites:
            return
        rec.locate_forward = True
        self._entries = []
        for block in self.blocks:
            for site in self.sites:
                rec.on_forward(getattr(block, f"hook_{site}"),
                               lambda x, key=(block.layer, site, "out"): self._forward(rec, key, x))
        rec.on_pass_end(lambda rows: self._pass_end(rec, rows))

    def _forward(self, rec: Recording, key: Key, x: torch.Tensor) -> None:
        self.hidden[key[:2]] = x.shape[-1]
        row = rec.token_row(x, forward=True)  # first: it may end the pass before this one
        self._entries.append((key, row))

    def _pass_end(self, rec: Recording, rows: TokenRows) -> None:
        entries, self._entries = self._entries, []
        if not entries:
            return
        keys, at = [k for k, _ in entries], rows.index([r for _, r in entries])
        e, t, s = len(keys), rows.per_token(), rows.summary()
        out, rob = outlier_masks(rows, at, self.factor)
        dev, mean = t.dev_sq.index_select(0, at), t.mean.index_select(0, at)
        n, n_out = rows.counts(e), out.sum(-1)
        shape = (e, rows.batch, rows.seq)
        sums = {"n": n, "n_out": n_out, "n_rob": n - n_out, "pos0_out": out.view(shape)[:, :, 0].sum(-1),
                "seqs": repeated(rows.batch, e, rows.device),
                "dev_sq": s.dev_sq.index_select(0, at), "dev_sq_out": masked_sum(dev, out),
                "dev_sq_rob": masked_sum(dev, rob), "mean_sq_rob": masked_sum(mean.square(), rob)}
        acc = rec.acc
        for field, value in sums.items():
            acc.add_block((self.name, field), [k + (field,) for k in keys], value)
        acc.add_block((self.name, "absmax_rob"), [k + ("absmax_rob",) for k in keys],
                      masked(t.absmax.index_select(0, at), rob, -math.inf).amax(-1), MAX)
        token, dim = rows.loc.index_select(0, at).unbind(-1)
        ids = rows.ids.reshape(-1)[token] if rows.ids is not None else torch.full_like(token, -1)
        acc.argmax_block((self.name, "loc"), [k + ("loc",) for k in keys], s.absmax.index_select(0, at),
                         torch.stack([dim, token % rows.seq, ids], -1))
        if self.intervals:
            per_seq = masked(dev, rob).view(shape).sum(-1), rob.view(shape).sum(-1)
            add_sequence_blocks(rec, (self.name, "var"), [k + ("var",) for k in keys], *per_seq)

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
