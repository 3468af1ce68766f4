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
from gpas_probe.probes.accumulator import Key
from gpas_probe.probes.config import ProbeConfig
from gpas_probe.probes.family import Emit, StatFamily, div, nan_sqrt
from gpas_probe.probes.outliers import add_sequence_blocks, outlier_masks, sequence_interval
from gpas_probe.probes.recording import Recording
from gpas_probe.probes.tokens import TokenRows, masked


class ShortcutBranchStats(StatFamily):
    """Per sub-layer: how much the residual shortcut outweighs the branch entering the same add."""

    name = "ratios"
    SUBLAYERS = ("attn", "mlp")

    def __init__(self, blocks: Sequence[ProbedLayer], config: ProbeConfig) -> None:
        self.blocks = blocks
        self.factor = config.outlier_factor
        self.intervals = config.intervals
        self._entries: list[tuple[Key, int, int, int]] = []  # (key, shortcut row, branch row, pair row)

    def arm(self, rec: Recording) -> None:
        self._entries = []
        for block in self.blocks:
            for sub in self.SUBLAYERS:
                pending: dict[str, tuple[torch.Tensor, int]] = {}  # the first of the pair seen in this forward
                for role, site in (("shortcut", f"{sub}_shortcut"), ("branch", f"{sub}_out")):
                    rec.on_forward(getattr(block, f"hook_{site}"),
                                   lambda x, layer=block.layer, sub=sub, role=role, pending=pending:
                                   self._seen(rec, layer, sub, role, pending, x))
        rec.on_pass_end(lambda rows: self._pass_end(rec, rows))

    def _seen(self, rec: Recording, layer: int, sub: str, role: str, pending: dict[str, tuple[torch.Tensor, int]],
              x: torch.Tensor) -> None:
        """Each tensor of the pair gets its row when it is seen; the second also their per-token dot product."""
        row = rec.token_row(x, forward=True)
        other = "branch" if role == "shortcut" else "shortcut"
        if other not in pending:
            pending[role] = (x, row)
            return
        y, other_row = pending.pop(other)
        (s, s_row), (b, b_row) = ((x, row), (y, other_row)) if role == "shortcut" else ((y, other_row), (x, row))
        self._entries.append(((layer, sub, "fwd"), s_row, b_row, rec.pair_row(s, b)))

    def _pass_end(self, rec: Recording, rows: TokenRows) -> None:
        """Per token: the squared norms of both (from their rows) and their cosine; then sums over the
        kept tokens, with and without the tokens whose shortcut is an outlier."""
        entries, self._entries = self._entries, []
        if not entries:
            return
        keys = [k for k, _, _, _ in entries]
        s_rows, b_rows = [e[1] for e in entries], [e[2] for e in entries]
        s_at, b_at = rows.index(s_rows), rows.index(b_rows)
        ms = rows.per_token().mean_square
        sq_s = ms.index_select(0, s_at) * rows.hidden_of(s_rows)  # (E, B*T)
        sq_b = ms.index_select(0, b_at) * rows.hidden_of(b_rows)
        assert rows.pairs is not None
        dot = rows.pairs.index_select(0, rows.index([e[3] for e in entries]))
        cos = dot / (sq_s.sqrt() * sq_b.sqrt()).clamp_min_(torch.finfo(rows.dtype).tiny)
        rob = outlier_masks(rows, s_at, self.factor)[1]
        rob_s, rob_b = masked(sq_s, rob), masked(sq_b, rob)
        e = len(keys)
        sums = {"n": rows.counts(e), "sq_s": rows.kept_sum(sq_s), "sq_b": rows.kept_sum(sq_b),
                "cos": rows.kept_sum(cos), "sq_s_rob": rob_s.sum(-1), "sq_b_rob": rob_b.sum(-1)}
        for field, value in sums.items():
            rec.acc.add_block((self.name, field), [k + (field,) for k in keys], value)
        if self.intervals:
            shape = (e, rows.batch, rows.seq)
            add_sequence_blocks(rec, (self.name, "ratio"), [k + ("ratio",) for k in keys],
                                rob_s.view(shape).sum(-1), rob_b.view(shape).sum(-1))

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
