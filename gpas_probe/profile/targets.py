"""The model being profiled, ours or a Hugging Face causal LM, behind one small interface: the
profile code never asks which it is (:func:`target_for` does, once)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

import torch
from torch import nn

from gpas_probe.analysis.importance import head_of
from gpas_probe.analysis.passes import LayerCapture, add_pass, sequence_losses
from gpas_probe.analysis.streaming import ImportanceSums
from gpas_probe.hf import instrument, is_instrumented, logits, uninstrument
from gpas_probe.hf.importance import add_hf_pass
from gpas_probe.model import Transformer
from gpas_probe.model.adapter import HFLayer


class Target(Protocol):
    """A model to profile: its logits, its context length, its decoder layers, how one forward pass
    captured from them (:class:`~gpas_probe.analysis.passes.LayerCapture`) becomes layer importance, and
    a context in which the probes can record it."""

    model: nn.Module

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor: ...
    def max_len(self) -> int | None: ...
    def layers(self) -> list[nn.Module]: ...
    def add_pass(self, capture: LayerCapture, input_ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                 logits: torch.Tensor, sums: ImportanceSums) -> None: ...
    def probed(self) -> AbstractContextManager[None]: ...


class NativeTarget:
    """Our :class:`~gpas_probe.model.Transformer`: hook points built in, deletion with prefix reuse."""

    def __init__(self, model: Transformer) -> None:
        self.model = model

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids).logits

    def max_len(self) -> int | None:
        return self.model.config.max_seq_len

    def layers(self) -> list[nn.Module]:
        return list(self.model.layers)

    def add_pass(self, capture: LayerCapture, input_ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                 logits: torch.Tensor, sums: ImportanceSums) -> None:
        add_pass(sums, capture, labels, mask, sequence_losses(logits, labels), head_of(self.model))

    @contextmanager
    def probed(self) -> Iterator[None]:
        yield


class HFTarget:
    """A Hugging Face causal LM, instrumented for the duration of :meth:`probed` (:mod:`gpas_probe.hf`)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        return logits(self.model, input_ids)

    def max_len(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    def layers(self) -> list[nn.Module]:
        return [layer.target for layer in self._layers()]

    def _layers(self) -> list[HFLayer]:
        return [b for b in instrument(self.model) if isinstance(b, HFLayer)]

    def add_pass(self, capture: LayerCapture, input_ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                 logits: torch.Tensor, sums: ImportanceSums) -> None:
        add_hf_pass(self.model, self._layers(), capture, input_ids, labels, mask, logits, sums)

    @contextmanager
    def probed(self) -> Iterator[None]:
        was_instrumented = is_instrumented(self.model)
        instrument(self.model)
        try:
            yield
        finally:
            if not was_instrumented:
                uninstrument(self.model)


def target_for(model: nn.Module) -> NativeTarget | HFTarget:
    """The :class:`Target` of ``model``: ours, or (anything else) a Hugging Face causal LM."""
    return NativeTarget(model) if isinstance(model, Transformer) else HFTarget(model)
