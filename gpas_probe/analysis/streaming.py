"""The streamed pass behind every layer-importance analysis, for any model that can report its residual
streams: batches go through one at a time and only per-layer sums are kept (:class:`ImportanceSums`),
so memory does not grow with the number of batches.

A model-specific ``update(input_ids, labels, mask, sums)`` runs one batch and adds what it measured
(:mod:`gpas_probe.analysis.importance` for our model, :mod:`gpas_probe.hf.importance` for Hugging Face
models); :func:`stream` drives it; :meth:`ImportanceSums.frames` turns the sums into the analyses' frames.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from gpas_probe.intervals import Interval, ratio_interval
from gpas_probe.model import IGNORE_INDEX

Batch = tuple[torch.Tensor, ...]
Update = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "ImportanceSums"], None]

#: Column sets of the frames :meth:`ImportanceSums.frames` returns.
DELETION_COLUMNS = ("layer", "loss_deleted", "base_loss", "delta", "delta_lo", "delta_hi")
ANGULAR_COLUMNS = ("layer", "n", "distance", "distance_lo", "distance_hi")
INFLUENCE_COLUMNS = ("layer", "influence", "influence_lo", "influence_hi")
ESTIMATE_COLUMNS = ("layer", "estimate", "estimate_lo", "estimate_hi")


def unpack_batch(batch: Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, labels, mask)`` on ``device``; the mask defaults to ``labels != IGNORE_INDEX``."""
    if len(batch) not in (2, 3):
        raise ValueError(f"a batch is (input_ids, labels) or (input_ids, labels, mask), got {len(batch)} items")
    input_ids, labels = batch[0].to(device), batch[1].to(device)
    if input_ids.ndim != 2 or labels.shape != input_ids.shape:
        raise ValueError(f"input_ids and labels must both be (B, T), got {tuple(input_ids.shape)} "
                         f"and {tuple(labels.shape)}")
    mask = batch[2].to(device).bool() if len(batch) == 3 else labels != IGNORE_INDEX
    if mask.shape != input_ids.shape:
        raise ValueError(f"mask must be (B, T) like input_ids, got {tuple(mask.shape)}")
    return input_ids, labels, mask


def last_token_index(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows with any real token, index of each such row's last real token)."""
    T = mask.shape[1]
    rows = mask.any(dim=1).nonzero().squeeze(1)
    last = T - 1 - mask[rows].flip(1).int().argmax(dim=1)
    return rows, last


class SequenceSums:
    """Sums over sequences of ``size`` ratios ``Σ_j x_j / Σ_j y_j`` sharing their denominators ``y_j``: the
    additive sums of :mod:`gpas_probe.intervals`, from which each ratio gets its 95% interval."""

    def __init__(self, size: int) -> None:
        self.m, self.sy, self.syy = 0, 0.0, 0.0
        self.sx, self.sxx, self.sxy = (torch.zeros(size, dtype=torch.float64) for _ in range(3))

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """``x``: (size, sequences) numerators, ``y``: (sequences,) denominators of one batch; a sequence
        with ``y = 0`` (no target, no token counted) carries no information and is left out."""
        x, y = x.detach().double().cpu(), y.detach().double().cpu()
        informative = y > 0
        x, y = x[:, informative], y[informative]
        self.m += len(y)
        self.sy += float(y.sum())
        self.syy += float(y @ y)
        self.sx += x.sum(1)
        self.sxx += (x * x).sum(1)
        self.sxy += x @ y

    def estimates(self) -> list[float]:
        return [float(v) / self.sy if self.sy else math.nan for v in self.sx]

    def intervals(self) -> list[Interval]:
        return [ratio_interval(self.m, float(sx), self.sy, float(sxx), self.syy, float(sxy))
                for sx, sxx, sxy in zip(self.sx, self.sxx, self.sxy, strict=True)]


@dataclass
class ImportanceSums:
    """Running sums of one streamed pass over ``num_layers`` layers; nothing here grows with the batches.

    ``deletion``, ``angular``, ``influence``, ``estimate`` say which analyses the pass measures. Each is
    kept per sequence (:class:`SequenceSums`), so every value comes with its 95% interval: deletion Δloss
    (exact, or its first-order ``estimate``) as the ratio of summed loss differences to summed targets,
    block influence of summed cosines to summed tokens, angular distance as a mean over sequences.
    ``skip_first_position`` leaves position 0 out of block influence (a sink token's stream barely turns)."""

    num_layers: int
    deletion: bool = False
    angular: bool = False
    influence: bool = False
    estimate: bool = False
    skip_first_position: bool = False
    base_loss: float = 0.0
    tokens: int = 0
    deleted_loss: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        L = self.num_layers
        self.deleted_loss = self.deleted_loss or [0.0] * L
        self.delta = SequenceSums(L)  # per sequence: deleted loss sum - base loss sum, over targets
        self.cos = SequenceSums(L)  # per sequence: summed cos(h_in, h_out), over real tokens
        self.angles = SequenceSums((L + 1) ** 2)  # per sequence: arccos(cos(h_i, h_j))/pi at its last token
        self.estimated = SequenceSums(L)  # per sequence: first-order change of its summed loss, over targets
        self._batch: dict[str, Any] = {}  # the current batch's per-sequence values, until end_batch

    @property
    def sequences(self) -> int:
        """Sequences with a real token seen by the angular distances."""
        return self.angles.m

    # -- what one batch adds (then end_batch) --------------------------------------------------
    def add_loss(self, per_sequence: torch.Tensor, targets: torch.Tensor) -> None:
        """The full model's summed loss of each sequence and its number of targets, both (B,)."""
        self.base_loss += float(per_sequence.sum())
        self.tokens += int(targets.sum())
        self._batch.update(base=per_sequence.double(), targets=targets)

    def add_deleted(self, layer: int, per_sequence: torch.Tensor) -> None:
        """The summed loss of each sequence with ``layer`` deleted, (B,)."""
        self.deleted_loss[layer] += float(per_sequence.sum())
        self._batch.setdefault("deleted", {})[layer] = per_sequence.double()

    def add_estimate(self, layer: int, per_sequence: torch.Tensor) -> None:
        """The first-order estimate of how much each sequence's summed loss rises with ``layer`` deleted, (B,)."""
        self._batch.setdefault("estimate", {})[layer] = per_sequence.double()

    def add_influence(self, layer: int, x: torch.Tensor, out: torch.Tensor, mask: torch.Tensor) -> None:
        """``layer``'s input ``x`` and output ``out`` (B, T, hidden), over the real tokens ``mask``."""
        if self.skip_first_position:
            mask = mask.clone()
            mask[:, 0] = False
        cos = F.cosine_similarity(x.double(), out.double(), dim=-1).masked_fill(~mask, 0.0)
        self._batch.setdefault("cos", {})[layer] = (cos.sum(-1), mask.sum(-1))

    def add_last_states(self, states: list[torch.Tensor]) -> None:
        """``h_0 .. h_L`` at each sequence's last real token: ``L + 1`` tensors of shape (sequences, hidden)."""
        if not states or not len(states[0]):
            return
        u = F.normalize(torch.stack([s.double() for s in states], dim=1), dim=-1)  # (B', L+1, hidden)
        gram = (u @ u.transpose(1, 2)).clamp(-1.0, 1.0)
        angles = torch.arccos(gram) / math.pi  # (B', L+1, L+1)
        self.angles.add(angles.reshape(len(angles), -1).T, torch.ones(len(angles), dtype=torch.float64))

    def end_batch(self) -> None:
        """Fold the batch's per-sequence values into the sums."""
        batch, self._batch = self._batch, {}
        if deleted := batch.get("deleted"):
            diffs = torch.stack([deleted[layer] - batch["base"] for layer in range(self.num_layers)])
            self.delta.add(diffs, batch["targets"])
        if estimate := batch.get("estimate"):
            self.estimated.add(torch.stack([estimate[layer] for layer in range(self.num_layers)]), batch["targets"])
        if cos := batch.get("cos"):
            self.cos.add(torch.stack([cos[layer][0] for layer in range(self.num_layers)]), cos[0][1])

    def check(self) -> None:
        """Raise ``ValueError`` when the batches held nothing to measure."""
        if (self.deletion or self.estimate) and self.tokens == 0:
            raise ValueError("no batch has a target token (every label is -100)")
        if self.angular and self.sequences == 0:
            raise ValueError("no batch has a sequence with a real token")
        if self.influence and self.cos.sy == 0:
            raise ValueError("no batch has a real token")

    # -- the frames ----------------------------------------------------------------------------
    def deletion_frame(self) -> pd.DataFrame:
        base = self.base_loss / self.tokens
        deleted = [s / self.tokens for s in self.deleted_loss]
        intervals = self.delta.intervals()
        return pd.DataFrame({"layer": range(self.num_layers), "loss_deleted": deleted, "base_loss": base,
                             "delta": [d - base for d in deleted], "delta_lo": [iv.lo for iv in intervals],
                             "delta_hi": [iv.hi for iv in intervals]})

    def angular_frame(self, normalize_rows: bool = False) -> pd.DataFrame:
        L = self.num_layers
        means = torch.tensor(self.angles.estimates()).reshape(L + 1, L + 1)
        intervals = self.angles.intervals()
        records = []
        for n in range(1, L + 1):
            for layer in range(L + 1 - n):
                iv = intervals[layer * (L + 1) + layer + n]  # distance(h_l, h_{l+n})
                records.append({"layer": layer, "n": n, "distance": float(means[layer, layer + n]),
                                "distance_lo": iv.lo, "distance_hi": iv.hi})
        df = pd.DataFrame.from_records(records, columns=list(ANGULAR_COLUMNS))
        if normalize_rows:
            df["distance_norm"] = df.groupby("n")["distance"].transform(_min_max)
        return df

    def influence_frame(self) -> pd.DataFrame:
        intervals = self.cos.intervals()  # of the mean cosine: influence = 1 - it, bounds swapped
        return pd.DataFrame({"layer": range(self.num_layers), "influence": [1.0 - c for c in self.cos.estimates()],
                             "influence_lo": [1.0 - iv.hi for iv in intervals],
                             "influence_hi": [1.0 - iv.lo for iv in intervals]})

    def estimate_frame(self) -> pd.DataFrame:
        intervals = self.estimated.intervals()
        return pd.DataFrame({"layer": range(self.num_layers), "estimate": self.estimated.estimates(),
                             "estimate_lo": [iv.lo for iv in intervals], "estimate_hi": [iv.hi for iv in intervals]})

    def base_frame(self) -> pd.DataFrame:
        """The full model's loss alone (``layer`` -1, ``base_loss``), for a pass without exact deletion."""
        return pd.DataFrame({"layer": [-1], "base_loss": [self.base_loss / self.tokens if self.tokens else math.nan]})

    def frames(self, normalize_rows: bool = False) -> dict[str, pd.DataFrame]:
        """What the pass measured, by key: ``deletion`` (or, without it, ``base`` for the loss),
        ``angular``, ``block_influence``, ``estimate``."""
        out = {"deletion": self.deletion_frame()} if self.deletion else {"base": self.base_frame()}
        if self.angular:
            out["angular"] = self.angular_frame(normalize_rows)
        if self.influence:
            out["block_influence"] = self.influence_frame()
        if self.estimate:
            out["estimate"] = self.estimate_frame()
        return out


def _min_max(d: pd.Series) -> pd.Series:
    lo, hi = d.min(), d.max()
    return (d - lo) / (hi - lo) if hi > lo else d * 0.0


def stream(model: nn.Module, batches: Iterable[Batch], sums: ImportanceSums, update: Update) -> ImportanceSums:
    """Run ``update`` on each batch (unpacked on the model's device) in eval and inference mode, restore
    the model's mode, and check that the batches had data; returns ``sums``."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in batches:
                update(*unpack_batch(batch, device), sums)
                sums.end_batch()
    finally:
        model.train(was_training)
    sums.check()
    return sums
