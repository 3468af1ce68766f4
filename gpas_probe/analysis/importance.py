"""Layer importance of our model (DESIGN §6, §8.9): deletion importance, angular distances, block influence.

All analyses are pure functions of a model and an iterable of batches ``(input_ids, labels)`` or
``(input_ids, labels, mask)``. ``labels`` are the targets aligned with the inputs (already shifted);
``IGNORE_INDEX`` (-100) marks positions without a target, including right padding. Batches are
streamed: one batch's states are alive at a time and only per-layer sums are kept, so memory does
not grow with the number of batches.

Which positions count as tokens (block influence) and which is a sequence's last token (angular
distance): the optional third element ``mask`` (bool, ``(B, T)``, true on real tokens) when given,
otherwise the positions whose label is not ``IGNORE_INDEX``. With right padding and shifted labels
the latter leaves out each sequence's final real input token (it has no target); pass ``mask`` to
include it. Position 0 is included.

Hidden states ``h_l`` are the residual stream entering decoder layer ``l``: ``h_0`` is the token
embedding and ``h_L`` the last layer's output before the final norm.

- Deletion importance (the paper's convention): deleting layer ``l`` skips it, so layer ``l + 1``
  receives ``h_l`` and every later layer keeps its weights. ``delta`` is the token-weighted mean
  validation loss with the layer deleted minus the same loss of the full model. The pass reuses the
  unchanged prefix: ``h_l`` comes from the single full forward, and only layers ``l+1..L-1`` are
  re-run, ``L(L-1)/2`` block calls per batch instead of ``L(L-1)`` for delete-and-rerun.
- Angular distance (Gromov et al. 2024, Mix-LN): ``arccos(cos(h_l, h_{l+n})) / pi`` at each
  sequence's last token, averaged over sequences, for every start ``l`` and block size ``n`` with
  ``l + n <= L``. Per-row normalization (``normalize_rows=True``) min-max scales each block size
  ``n`` across starts ``l`` to [0, 1]: ``(d - min_l d) / (max_l d - min_l d)``; a row whose
  distances are all equal (for instance ``n = L``, which has one start) is set to 0.
- Block influence (ShortGPT): ``1 - cos(h_l, h_{l+1})`` averaged over all tokens.
"""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd
import torch
import torch.nn.functional as F

from gpas_probe.analysis.streaming import Batch, ImportanceSums, last_token_index, stream
from gpas_probe.model import IGNORE_INDEX, Transformer


def _embed(model: Transformer, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = model.embed_tokens(input_ids)
    cos, sin = model.rotary(input_ids.shape[1], x.dtype)
    return x, cos, sin


def _loss_sum(model: Transformer, h: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """Summed cross-entropy and token count of the head applied to pre-norm states ``h``.

    The head runs only at positions with a target: the norm and head act per token, so this equals
    the model's own loss on those positions."""
    keep = labels != IGNORE_INDEX
    n = int(keep.sum())
    if n == 0:
        return 0.0, 0
    logits = model.lm_head(model.norm(h[keep]))
    return float(F.cross_entropy(logits.float(), labels[keep], reduction="sum")), n


def forward_skipping(model: Transformer, input_ids: torch.Tensor, skip: Iterable[int] = ()) -> torch.Tensor:
    """Pre-final-norm hidden states of the model with the layers in ``skip`` deleted (skipped)."""
    skip = set(skip)
    x, cos, sin = _embed(model, input_ids)
    for layer, block in enumerate(model.layers):
        if layer not in skip:
            x = block(x, cos, sin)
    return x


def _update(model: Transformer, input_ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
            sums: ImportanceSums) -> None:
    """One batch of the one-pass analyses, reusing the unchanged prefix for each deletion."""
    rows, last = last_token_index(mask)
    x, cos, sin = _embed(model, input_ids)
    layers = model.layers
    states = []  # h_l at each sequence's last token, for the angular distances
    for layer, block in enumerate(layers):
        if sums.deletion:
            y = x  # deleting `layer`: the later layers start from its input, the unchanged prefix
            for later in layers[layer + 1:]:
                y = later(y, cos, sin)
            sums.add_deleted(layer, _loss_sum(model, y, labels)[0])
        if sums.angular:
            states.append(x[rows, last])
        out = block(x, cos, sin)
        if sums.influence:
            sums.add_influence(layer, x, out, mask)
        x = out
    sums.add_loss(*_loss_sum(model, x, labels), mask)
    if sums.angular:
        sums.add_last_states([*states, x[rows, last]])


def _run(model: Transformer, batches: Iterable[Batch], **flags: bool) -> ImportanceSums:
    sums = ImportanceSums(len(model.layers), **flags)
    return stream(model, batches, sums, lambda *args: _update(model, *args))


def deletion_importance(model: Transformer, batches: Iterable[Batch]) -> pd.DataFrame:
    """Loss increase when each decoder layer is deleted, reusing the unchanged prefix.

    Returns columns ``layer``, ``loss_deleted``, ``base_loss``, ``delta = loss_deleted - base_loss``;
    losses are means over every target token of every batch."""
    return _run(model, batches, deletion=True).deletion_frame()


def naive_deletion_importance(model: Transformer, batches: Iterable[Batch]) -> pd.DataFrame:
    """The delete-and-rerun reference of :func:`deletion_importance`: one full forward per layer."""
    L = len(model.layers)

    def update(input_ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, sums: ImportanceSums) -> None:
        sums.add_loss(*_loss_sum(model, forward_skipping(model, input_ids), labels), mask)
        for layer in range(L):
            sums.add_deleted(layer, _loss_sum(model, forward_skipping(model, input_ids, [layer]), labels)[0])

    return stream(model, batches, ImportanceSums(L, deletion=True), update).deletion_frame()


def angular_distances(model: Transformer, batches: Iterable[Batch], normalize_rows: bool = False) -> pd.DataFrame:
    """Mean angular distance ``arccos(cos(h_l, h_{l+n}))/pi`` at each sequence's last token.

    Long format: ``layer`` (start ``l``), ``n`` (block size, ``1..L-l``), ``distance``; with
    ``normalize_rows`` also ``distance_norm``, each ``n`` min-max scaled across ``l`` (module doc)."""
    return _run(model, batches, angular=True).angular_frame(normalize_rows)


def block_influence(model: Transformer, batches: Iterable[Batch]) -> pd.DataFrame:
    """ShortGPT's block influence ``1 - cos(layer input, layer output)``, averaged over all tokens.

    Columns ``layer``, ``influence``."""
    return _run(model, batches, influence=True).influence_frame()


def layer_importance(model: Transformer, batches: Iterable[Batch],
                     normalize_rows: bool = False) -> dict[str, pd.DataFrame]:
    """All three analyses in one streamed pass: keys ``deletion``, ``angular``, ``block_influence``."""
    return _run(model, batches, deletion=True, angular=True, influence=True).frames(normalize_rows)
