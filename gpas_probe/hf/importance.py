"""Layer importance of Hugging Face causal LMs, through the streamed pass of
:mod:`gpas_probe.analysis.streaming` and the same definitions as our model's
(:mod:`gpas_probe.analysis.importance`): ``h_l`` is the residual stream entering layer ``l``, ``h_L`` the
last layer's output before the final norm. Deleting a layer replaces its output by its input; the later
layers are replayed on it with the calls recorded in the one forward pass (prefix reuse, as for our model),
when the model's final norm and head are found and reproduce its logits; otherwise the whole model runs
once per deleted layer."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pandas as pd
import torch
from torch import nn

from gpas_probe.analysis.passes import Head, LayerCapture, add_pass, sequence_losses
from gpas_probe.analysis.streaming import Batch, ImportanceSums, stream
from gpas_probe.hf.loading import logits
from gpas_probe.model import IGNORE_INDEX
from gpas_probe.model.adapter import HFLayer, find_decoder_layers, hidden_in, instrument, with_first

_NORMS = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f")


def output_head(model: nn.Module) -> Head | None:
    """The model's final norm and output projection as one per-position function, when it has the usual
    ones (beside its decoder layers, and ``get_output_embeddings()``); None otherwise. :func:`verified_head`
    checks it against the model's own logits before it is trusted."""
    path, _ = find_decoder_layers(model)
    parent = model.get_submodule(path.rpartition(".")[0]) if "." in path else model
    norm = next((m for name in _NORMS if isinstance(m := getattr(parent, name, None), nn.Module)), None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if norm is None or head is None:
        return None
    return lambda h: head(norm(h))


def verified_head(model: nn.Module, h_last: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> Head | None:
    """:func:`output_head`, if it turns the last layer's states into the model's logits (to float32
    precision, at the positions with a target); a model that scales or caps its logits gets None, and
    deletion runs whole forwards instead."""
    head = output_head(model)
    if head is None:
        return None
    keep = labels != IGNORE_INDEX
    with torch.no_grad():
        mine, theirs = head(h_last[keep]).float(), logits[keep].float()
    scale = theirs.abs().max().clamp_min(1e-6)
    return head if mine.shape == theirs.shape and float((mine - theirs).abs().max() / scale) < 1e-3 else None


def _skip_hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
    """A forward hook that deletes a layer: its output becomes its input."""
    x = hidden_in(args, kwargs)
    if x is None:
        raise ValueError("cannot delete a layer whose input hidden states are not its first argument")
    return with_first(output, x)


def deleted_losses_by_rerun(model: nn.Module, layers: list[HFLayer], input_ids: torch.Tensor,
                            labels: torch.Tensor) -> list[torch.Tensor]:
    """Each sequence's summed loss with each layer deleted, one whole forward per layer (for a model whose
    head :func:`verified_head` could not confirm)."""
    out = []
    for hfl in layers:
        handle = hfl.target.register_forward_hook(_skip_hook, with_kwargs=True)
        try:
            out.append(sequence_losses(logits(model, input_ids), labels))
        finally:
            handle.remove()
    return out


def add_hf_pass(model: nn.Module, layers: list[HFLayer], capture: LayerCapture, input_ids: torch.Tensor,
                labels: torch.Tensor, mask: torch.Tensor, full_logits: torch.Tensor, sums: ImportanceSums) -> None:
    """:func:`gpas_probe.analysis.passes.add_pass` for a Hugging Face model: deletion replays the later
    layers when the head is verified, else reruns the model once per layer."""
    L = len(layers)
    if not capture.complete:
        raise ValueError(f"{type(model).__name__}: a forward pass did not run all {L} decoder layers")
    head = verified_head(model, capture.states[-1], full_logits, labels) if sums.deletion else None  # type: ignore[arg-type]
    add_pass(sums, capture, labels, mask, sequence_losses(full_logits, labels), head)
    if sums.deletion and head is None:
        with torch.inference_mode():
            for layer, loss in enumerate(deleted_losses_by_rerun(model, layers, input_ids, labels)):
                sums.add_deleted(layer, loss)


def _update(model: nn.Module, layers: list[HFLayer], input_ids: torch.Tensor, labels: torch.Tensor,
            mask: torch.Tensor, sums: ImportanceSums) -> None:
    with LayerCapture([hfl.target for hfl in layers]) as capture:
        full = logits(model, input_ids)
    add_hf_pass(model, layers, capture, input_ids, labels, mask, full, sums)


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
