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


def _targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(positions with a target, the sequence of each, targets per sequence) of a batch's labels."""
    keep = labels != IGNORE_INDEX
    return keep, keep.nonzero()[:, 0], keep.sum(-1)


def _loss_per_sequence(model: Transformer, h: torch.Tensor, labels: torch.Tensor,
                       targets: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Summed cross-entropy of each sequence (B,) of the head applied to pre-norm states ``h``.

    The head runs only at positions with a target: the norm and head act per token, so this equals
    the model's own loss on those positions."""
    keep, rows, _ = targets
    out = torch.zeros(len(labels), dtype=torch.float64, device=h.device)
    if len(rows):
        logits = model.lm_head(model.norm(h[keep]))
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # float64 models stay float64
        out.index_add_(0, rows, F.cross_entropy(logits, labels[keep], reduction="none").double())
    return out


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
    targets = _targets(labels)
    x, cos, sin = _embed(model, input_ids)
    layers = model.layers
    states = []  # h_l at each sequence's last token, for the angular distances
    for layer, block in enumerate(layers):
        if sums.deletion:
            y = x  # deleting `layer`: the later layers start from its input, the unchanged prefix
            for later in layers[layer + 1:]:
                y = later(y, cos, sin)
            sums.add_deleted(layer, _loss_per_sequence(model, y, labels, targets))
        if sums.angular:
            states.append(x[rows, last])
        out = block(x, cos, sin)
        if sums.influence:
            sums.add_influence(layer, x, out, mask)
        x = out
    sums.add_loss(_loss_per_sequence(model, x, labels, targets), targets[2])
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
        targets = _targets(labels)
        sums.add_loss(_loss_per_sequence(model, forward_skipping(model, input_ids), labels, targets), targets[2])
        for layer in range(L):
            skipped = forward_skipping(model, input_ids, [layer])
            sums.add_deleted(layer, _loss_per_sequence(model, skipped, labels, targets))

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


def layer_importance(model: Transformer, batches: Iterable[Batch], normalize_rows: bool = False,
                     skip_first_position: bool = False) -> dict[str, pd.DataFrame]:
    """All three analyses in one streamed pass: keys ``deletion``, ``angular``, ``block_influence``
    (``skip_first_position`` leaves position 0 out of block influence)."""
    return _run(model, batches, deletion=True, angular=True, influence=True,
                skip_first_position=skip_first_position).frames(normalize_rows)
