"""One forward pass, reused by every layer-importance analysis, for our model and Hugging Face models alike.

:class:`LayerCapture` watches the decoder layers during a forward pass and keeps, detached, the residual
stream ``h_l`` entering each layer and ``h_L`` leaving the last, with each layer's call (its arguments:
position embeddings, masks). From them, with no second full forward:

- exact deletion (:func:`deleted_losses`): deleting layer ``l`` replays layers ``l+1 .. L-1`` on ``h_l``
  with their recorded calls (prefix reuse, ``L(L-1)/2`` layer calls per batch) and applies the head;
- block influence and angular distance (:func:`add_pass`) read the states directly;
- the first-order deletion estimate: when the pass is followed by a backward, the gradient ``g_{l+1}``
  at layer ``l``'s output dotted with the change deletion makes there, ``h_l - h_{l+1}`` (minus the
  layer's total contribution), summed over every position of a sequence: ``Δloss_l ≈ g_{l+1} · (h_l -
  h_{l+1})``. It costs two elementwise passes per layer during the backward.

The head (``head(h) -> logits``) must act on each position alone (a final norm and a linear map), which
is how the loss is taken only at positions with a target.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gpas_probe.analysis.streaming import ImportanceSums, last_token_index
from gpas_probe.model import IGNORE_INDEX
from gpas_probe.model.adapter import hidden_in, hidden_out, with_hidden

Head = Callable[[torch.Tensor], torch.Tensor]


class LayerCapture:
    """The states, calls and (with ``estimate``) per-sequence deletion estimates of one pass through
    ``layers``; use as a context manager around the forward (and the backward, for estimates).

    ``scale`` multiplies the estimates: the backward's loss divided by ``scale`` is a sum of token losses
    (a profile backpropagates ``sum / N``; give ``N``), so the estimates are changes of summed losses."""

    def __init__(self, layers: Sequence[nn.Module], estimate: bool = False, scale: float = 1.0) -> None:
        self.layers = list(layers)
        self.estimate, self.scale = estimate, scale
        L = len(self.layers)
        self.states: list[torch.Tensor | None] = [None] * (L + 1)
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any]] | None] = [None] * L
        self.estimates: list[torch.Tensor | None] = [None] * L
        self._handles: list[Any] = []

    def __enter__(self) -> LayerCapture:
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_pre_hook(partial(self._enter, i), with_kwargs=True))
        self._handles.append(self.layers[-1].register_forward_hook(self._leave))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _enter(self, i: int, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = hidden_in(args, kwargs)
        if x is None:
            raise ValueError(f"decoder layer {i} takes no (batch, seq, hidden) states as its first argument")
        self.states[i] = x.detach()
        self.calls[i] = (args, kwargs)
        if self.estimate and i > 0 and x.requires_grad:
            x.register_hook(partial(self._gradient, i - 1))

    def _leave(self, _module: nn.Module, _args: Any, output: Any) -> None:
        y = hidden_out(output)
        if y is None:
            raise ValueError("the last decoder layer returned no (batch, seq, hidden) states")
        self.states[-1] = y.detach()
        if self.estimate and y.requires_grad:
            y.register_hook(partial(self._gradient, len(self.layers) - 1))

    def _gradient(self, layer: int, grad: torch.Tensor) -> None:
        before, after = self.states[layer], self.states[layer + 1]
        assert before is not None and after is not None
        dot = first_order_delta(grad, before, after, self.scale)
        previous = self.estimates[layer]
        self.estimates[layer] = dot if previous is None else previous + dot

    @property
    def complete(self) -> bool:
        return all(s is not None for s in self.states)

    def replay(self, start: int, x: torch.Tensor) -> torch.Tensor:
        """Layers ``start ..`` applied to ``x`` with their recorded calls: the stream when layer ``start - 1``
        is deleted and ``x = h_{start-1}``."""
        for j in range(start, len(self.layers)):
            call = self.calls[j]
            assert call is not None
            args, kwargs = with_hidden(*call, x)
            out = hidden_out(self.layers[j](*args, **kwargs))
            if out is None:
                raise ValueError(f"decoder layer {j} returned no (batch, seq, hidden) states")
            x = out
        return x


def first_order_delta(grad: torch.Tensor, before: torch.Tensor, after: torch.Tensor,
                      scale: float = 1.0) -> torch.Tensor:
    """The first-order change of each sequence's loss (B,) when a layer whose input is ``before`` and output
    ``after`` is deleted: ``grad`` (at its output) dotted with ``before - after`` over every position,
    times ``scale`` (:class:`LayerCapture`)."""
    return (grad * (before - after)).sum(-1, dtype=torch.float64).sum(-1) * scale


def _wide(logits: torch.Tensor) -> torch.Tensor:
    """Logits in at least float32 for the loss (float64 models stay float64)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def loss_per_sequence(head: Head, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of each sequence (B,) of ``head`` applied to states ``h``, computed only at
    positions with a target (the head acts per position)."""
    keep = labels != IGNORE_INDEX
    rows = keep.nonzero()[:, 0]
    out = torch.zeros(len(labels), dtype=torch.float64, device=h.device)
    if len(rows):
        out.index_add_(0, rows, F.cross_entropy(_wide(head(h[keep])), labels[keep], reduction="none").double())
    return out


def sequence_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of each sequence, (B,), from a model's full logits (B, T, vocab)."""
    ce = F.cross_entropy(_wide(logits).flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
    return ce.double().reshape(labels.shape).sum(-1)


def summed_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The cross-entropy summed over every position with a target, differentiable (a scalar)."""
    return F.cross_entropy(_wide(logits).flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def deleted_losses(capture: LayerCapture, head: Head, labels: torch.Tensor) -> list[torch.Tensor]:
    """Each sequence's summed loss with each layer deleted (the paper's convention: the later layers keep
    their weights), by replaying the later layers on the captured ``h_l``."""
    L = len(capture.layers)
    out = []
    for layer in range(L):
        h = capture.states[layer]
        assert h is not None
        out.append(loss_per_sequence(head, capture.replay(layer + 1, h), labels))
    return out


def add_pass(sums: ImportanceSums, capture: LayerCapture, labels: torch.Tensor, mask: torch.Tensor,
             base: torch.Tensor, head: Head | None) -> None:
    """Add one batch's analyses to ``sums`` from a completed capture: ``base`` is each sequence's summed
    loss of the full model; exact deletion replays the layers when ``head`` is given (without it, the
    caller adds the deleted losses). Call ``sums.end_batch()`` after."""
    states = capture.states
    L = len(capture.layers)
    sums.add_loss(base, (labels != IGNORE_INDEX).sum(-1))
    if sums.deletion and head is not None:
        with torch.inference_mode():
            for layer, loss in enumerate(deleted_losses(capture, head, labels)):
                sums.add_deleted(layer, loss)
    if sums.influence:
        for layer in range(L):
            sums.add_influence(layer, states[layer], states[layer + 1], mask)  # type: ignore[arg-type]
    if sums.angular:
        rows, last = last_token_index(mask)
        sums.add_last_states([s[rows, last] for s in states])  # type: ignore[index]
    if sums.estimate:
        for layer, est in enumerate(capture.estimates):
            if est is None:
                raise ValueError(f"no gradient reached layer {layer}'s output: the estimate needs a backward pass")
            sums.add_estimate(layer, est)
