"""Layer importance of Hugging Face causal LMs, through the streamed pass of
:mod:`gpas_probe.analysis.streaming` and the same definitions as our model's
(:mod:`gpas_probe.analysis.importance`): ``h_l`` is the residual stream entering layer ``l``, ``h_L`` the
last layer's output before the final norm. Deleting a layer replaces its output by its input, one forward
pass per layer and batch (no prefix reuse)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from gpas_probe.analysis.streaming import Batch, ImportanceSums, last_token_index, stream
from gpas_probe.hf.loading import logits
from gpas_probe.model import IGNORE_INDEX
from gpas_probe.model.adapter import HFLayer, hidden_in, instrument, with_first


def _loss_per_sequence(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of each sequence, (B,)."""
    out = logits(model, input_ids)
    out = out.to(torch.promote_types(out.dtype, torch.float32))  # float64 models stay float64
    ce = F.cross_entropy(out.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
    return ce.double().reshape(labels.shape).sum(-1)


class _Capture:
    """The residual stream entering every layer and leaving the last, from one forward pass."""

    def __init__(self, layers: list[HFLayer]) -> None:
        self.pre: dict[int, torch.Tensor] = {}
        self.post: dict[int, torch.Tensor] = {}
        self.handles = []
        for hfl in layers:
            self.handles.append(hfl.hook_resid_pre.register_forward_hook(
                lambda _m, _a, out, i=hfl.layer: self.pre.__setitem__(i, out)))
            self.handles.append(hfl.hook_resid_post.register_forward_hook(
                lambda _m, _a, out, i=hfl.layer: self.post.__setitem__(i, out)))

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _skip_hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
    """A forward hook that deletes a layer: its output becomes its input."""
    x = hidden_in(args, kwargs)
    if x is None:
        raise ValueError("cannot delete a layer whose input hidden states are not its first argument")
    return with_first(output, x)


def _update(model: nn.Module, layers: list[HFLayer], input_ids: torch.Tensor, labels: torch.Tensor,
            mask: torch.Tensor, sums: ImportanceSums) -> None:
    rows, last = last_token_index(mask)
    L = len(layers)
    cap = _Capture(layers)
    try:
        s = _loss_per_sequence(model, input_ids, labels)
    finally:
        cap.close()
    if len(cap.pre) != L or len(cap.post) != L:
        raise ValueError(f"{type(model).__name__}: a forward pass ran {len(cap.pre)} of its {L} decoder layers")
    sums.add_loss(s, (labels != IGNORE_INDEX).sum(-1))
    for layer, hfl in enumerate(layers):
        sums.add_influence(layer, cap.pre[layer], cap.post[layer], mask)
        handle = hfl.target.register_forward_hook(_skip_hook, with_kwargs=True)
        try:
            sums.add_deleted(layer, _loss_per_sequence(model, input_ids, labels))
        finally:
            handle.remove()
    sums.add_last_states([cap.pre[i][rows, last] for i in range(L)] + [cap.post[L - 1][rows, last]])


def layer_importance(model: nn.Module, batches: Iterable[Batch], normalize_rows: bool = False,
                     skip_first_position: bool = False) -> dict[str, pd.DataFrame]:
    """Deletion importance, angular distances and block influence of an HF causal LM (instrumented
    here if it is not yet), as :func:`gpas_probe.analysis.importance.layer_importance` returns them
    for our model: keys ``deletion``, ``angular``, ``block_influence``. Batches are
    ``(input_ids, labels[, mask])`` with labels already shifted, -100 where there is no target."""
    layers = [b for b in instrument(model) if isinstance(b, HFLayer)]
    if not layers:
        raise ValueError(f"{type(model).__name__} is not a Hugging Face model; use "
                         f"gpas_probe.analysis.importance.layer_importance")
    sums = ImportanceSums(len(layers), deletion=True, angular=True, influence=True,
                          skip_first_position=skip_first_position)
    return stream(model, batches, sums, lambda *args: _update(model, layers, *args)).frames(normalize_rows)
