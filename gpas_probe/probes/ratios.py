"""Per sub-layer: how much the residual shortcut outweighs the branch entering the same add.

- ``shortcut_branch_ratio``: ``rms(shortcut) / rms(branch)`` over all elements, where the shortcut is
  the residual term and the branch the sub-layer output as they enter the add;
- ``shortcut_branch_cos``: the cosine between the two over the hidden dimension, per token, averaged;
- ``shortcut_branch_ratio_robust``: the ratio without the tokens whose shortcut is an outlier (RMS over
  ``outlier_factor`` times the median token's: a sink token's stream drowns every branch); with
  ``ProbeConfig.intervals`` also its 95% interval ``shortcut_branch_ratio_robust_lo``/``_hi`` from
  per-sequence sums (:mod:`gpas_probe.intervals`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from gpas_probe.model.hooks import ProbedLayer
from gpas_probe.probes.accumulator import Key, stat_dtype
from gpas_probe.probes.config import ProbeConfig
from gpas_probe.probes.family import Emit, StatFamily, count, div, masked, nan_sqrt
from gpas_probe.probes.outliers import add_sequence_sums, outlier_mask, sequence_interval
from gpas_probe.probes.recording import Recording


class ShortcutBranchStats(StatFamily):
    """Per sub-layer: how much the residual shortcut outweighs the branch entering the same add."""

    name = "ratios"
    SUBLAYERS = ("attn", "mlp")

    def __init__(self, blocks: Sequence[ProbedLayer], config: ProbeConfig) -> None:
        self.blocks = blocks
        self.factor = config.outlier_factor
        self.intervals = config.intervals

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

    def _add(self, rec: Recording, key: Key, s: torch.Tensor, b: torch.Tensor, keep: torch.Tensor | None) -> None:
        """Per token: the norms of both (``vector_norm`` over the hidden dimension: one pass, no
        temporary) and their dot product (the product in the step's scratch buffer); then sums."""
        dt = torch.promote_types(stat_dtype(s), stat_dtype(b))
        s, b = s.to(dt), b.to(dt)
        norm_s, norm_b = torch.linalg.vector_norm(s, dim=-1), torch.linalg.vector_norm(b, dim=-1)
        cos = torch.mul(s, b, out=rec.scratch(s)).sum(-1).div_((norm_s * norm_b).clamp_min_(torch.finfo(dt).tiny))
        sq_s, sq_b = norm_s.square(), norm_b.square()  # (B, T)
        rob = rec.kept(s) & ~outlier_mask(sq_s / s.shape[-1], rec.kept(s), self.factor)
        rob_s, rob_b = masked(sq_s, rob), masked(sq_b, rob)
        rec.acc.add(key + ("n",), count(s, keep))
        rec.acc.add(key + ("sq_s",), masked(sq_s, keep).sum())
        rec.acc.add(key + ("sq_b",), masked(sq_b, keep).sum())
        rec.acc.add(key + ("cos",), masked(cos, keep).sum())
        rec.acc.add(key + ("sq_s_rob",), rob_s.sum())
        rec.acc.add(key + ("sq_b_rob",), rob_b.sum())
        if self.intervals:
            add_sequence_sums(rec, key + ("ratio",), rob_s.sum(-1), rob_b.sum(-1))

    def rows(self, values: Mapping[Key, float], info: Mapping[str, Any], emit: Emit) -> None:
        for block in self.blocks:
            for sub in self.SUBLAYERS:
                key = (block.layer, sub, "fwd")
                if key + ("n",) not in values:
                    continue
                ratio = nan_sqrt(div(values[key + ("sq_s",)], values[key + ("sq_b",)]))
                emit(block.layer, sub, "fwd", "shortcut_branch_ratio", ratio)
                emit(block.layer, sub, "fwd", "shortcut_branch_cos", div(values[key + ("cos",)], values[key + ("n",)]))
                robust = nan_sqrt(div(values[key + ("sq_s_rob",)], values[key + ("sq_b_rob",)]))
                emit(block.layer, sub, "fwd", "shortcut_branch_ratio_robust", robust)
                if self.intervals:
                    lo, hi = sequence_interval(values, key + ("ratio",))
                    emit(block.layer, sub, "fwd", "shortcut_branch_ratio_robust_lo", nan_sqrt(max(lo, 0.0)))
                    emit(block.layer, sub, "fwd", "shortcut_branch_ratio_robust_hi", nan_sqrt(hi))
