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
  unchanged prefix (:mod:`gpas_probe.analysis.passes`): ``h_l`` comes from the single full forward, and
  only layers ``l+1..L-1`` are re-run, ``L(L-1)/2`` block calls per batch instead of ``L(L-1)`` for
  delete-and-rerun.
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

from gpas_probe.analysis.passes import Head, LayerCapture, add_pass, loss_per_sequence
from gpas_probe.analysis.streaming import Batch, ImportanceSums, stream
from gpas_probe.model import IGNORE_INDEX, Transformer


def head_of(model: Transformer) -> Head:
    """Our model's head: the final norm and the output projection, per position."""
    return lambda h: model.lm_head(model.norm(h))


def forward_skipping(model: Transformer, input_ids: torch.Tensor, skip: Iterable[int] = ()) -> torch.Tensor:
    """Pre-final-norm hidden states of the model with the layers in ``skip`` deleted (skipped)."""
    skip = set(skip)
    x = model.embed_tokens(input_ids)
    cos, sin = model.rotary(input_ids.shape[1], x.dtype)
    for layer, block in enumerate(model.layers):
        if layer not in skip:
            x = block(x, cos, sin)
    return x


def _update(model: Transformer, input_ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
            sums: ImportanceSums) -> None:
    """One batch of the one-pass analyses: one forward, then each deletion replays only the later layers."""
    with LayerCapture(model.layers) as capture:
        h = model.hidden_states(input_ids)
    head = head_of(model)
    add_pass(sums, capture, labels, mask, loss_per_sequence(head, h, labels), head)


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

    head = head_of(model)

    def update(input_ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, sums: ImportanceSums) -> None:
        full = loss_per_sequence(head, forward_skipping(model, input_ids), labels)
        sums.add_loss(full, (labels != IGNORE_INDEX).sum(-1))
        for layer in range(L):
            sums.add_deleted(layer, loss_per_sequence(head, forward_skipping(model, input_ids, [layer]), labels))

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
