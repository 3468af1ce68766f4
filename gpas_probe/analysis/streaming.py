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

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from gpas_probe.model import IGNORE_INDEX

Batch = tuple[torch.Tensor, ...]
Update = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "ImportanceSums"], None]

#: Column sets of the frames :meth:`ImportanceSums.frames` returns.
DELETION_COLUMNS = ("layer", "loss_deleted", "base_loss", "delta")
ANGULAR_COLUMNS = ("layer", "n", "distance")
INFLUENCE_COLUMNS = ("layer", "influence")


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


@dataclass
class ImportanceSums:
    """Running sums of one streamed pass over ``num_layers`` layers; nothing here grows with the batches.

    ``deletion``, ``angular``, ``influence`` say which analyses the pass measures."""

    num_layers: int
    deletion: bool = False
    angular: bool = False
    influence: bool = False
    base_loss: float = 0.0
    tokens: int = 0
    mask_tokens: int = 0
    sequences: int = 0
    deleted_loss: list[float] = field(default_factory=list)
    cos_sum: list[float] = field(default_factory=list)
    angle_sum: torch.Tensor | None = None  # (L+1, L+1): sum over sequences of arccos(cos(h_i, h_j))/pi

    def __post_init__(self) -> None:
        L = self.num_layers
        self.deleted_loss = self.deleted_loss or [0.0] * L
        self.cos_sum = self.cos_sum or [0.0] * L
        if self.angular and self.angle_sum is None:
            self.angle_sum = torch.zeros(L + 1, L + 1, dtype=torch.float64)

    # -- what one batch adds -------------------------------------------------------------------
    def add_loss(self, loss_sum: float, targets: int, mask: torch.Tensor) -> None:
        """The full model's summed loss over ``targets`` target tokens; ``mask`` the batch's real tokens."""
        self.base_loss += loss_sum
        self.tokens += targets
        self.mask_tokens += int(mask.sum())

    def add_deleted(self, layer: int, loss_sum: float) -> None:
        """The summed loss of the model with ``layer`` deleted."""
        self.deleted_loss[layer] += loss_sum

    def add_influence(self, layer: int, x: torch.Tensor, out: torch.Tensor, mask: torch.Tensor) -> None:
        """``layer``'s input ``x`` and output ``out`` (B, T, hidden), over the real tokens ``mask``."""
        self.cos_sum[layer] += float(F.cosine_similarity(x[mask].double(), out[mask].double(), dim=-1).sum())

    def add_last_states(self, states: list[torch.Tensor]) -> None:
        """``h_0 .. h_L`` at each sequence's last real token: ``L + 1`` tensors of shape (sequences, hidden)."""
        if not states or not len(states[0]):
            return
        u = F.normalize(torch.stack([s.double() for s in states], dim=1), dim=-1)  # (B', L+1, hidden)
        gram = (u @ u.transpose(1, 2)).clamp(-1.0, 1.0)
        assert self.angle_sum is not None
        self.angle_sum += (torch.arccos(gram) / math.pi).sum(0).cpu()
        self.sequences += len(states[0])

    def check(self) -> None:
        """Raise ``ValueError`` when the batches held nothing to measure."""
        if self.deletion and self.tokens == 0:
            raise ValueError("no batch has a target token (every label is -100)")
        if self.angular and self.sequences == 0:
            raise ValueError("no batch has a sequence with a real token")
        if self.influence and self.mask_tokens == 0:
            raise ValueError("no batch has a real token")

    # -- the frames ----------------------------------------------------------------------------
    def deletion_frame(self) -> pd.DataFrame:
        base = self.base_loss / self.tokens
        deleted = [s / self.tokens for s in self.deleted_loss]
        return pd.DataFrame({"layer": range(self.num_layers), "loss_deleted": deleted, "base_loss": base,
                             "delta": [d - base for d in deleted]})

    def angular_frame(self, normalize_rows: bool = False) -> pd.DataFrame:
        assert self.angle_sum is not None
        mean = self.angle_sum / self.sequences
        records = []
        for n in range(1, self.num_layers + 1):
            row = mean.diagonal(offset=n)  # row[l] = distance(h_l, h_{l+n}), l = 0..L-n
            records.extend({"layer": layer, "n": n, "distance": float(d)} for layer, d in enumerate(row))
        df = pd.DataFrame.from_records(records, columns=list(ANGULAR_COLUMNS))
        if normalize_rows:
            df["distance_norm"] = df.groupby("n")["distance"].transform(_min_max)
        return df

    def influence_frame(self) -> pd.DataFrame:
        return pd.DataFrame({"layer": range(self.num_layers),
                             "influence": [1.0 - c / self.mask_tokens for c in self.cos_sum]})

    def frames(self, normalize_rows: bool = False) -> dict[str, pd.DataFrame]:
        """Keys ``deletion``, ``angular``, ``block_influence`` (a pass that measured all three)."""
        return {"deletion": self.deletion_frame(), "angular": self.angular_frame(normalize_rows),
                "block_influence": self.influence_frame()}


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
    finally:
        model.train(was_training)
    sums.check()
    return sums
