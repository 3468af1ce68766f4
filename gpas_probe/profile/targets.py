"""The model being profiled, ours or a Hugging Face causal LM, behind one small interface: the
profile code never asks which it is (:func:`target_for` does, once)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

import pandas as pd
import torch
from torch import nn

from gpas_probe.analysis import layer_importance
from gpas_probe.analysis.streaming import Batch
from gpas_probe.hf import instrument, is_instrumented, logits, uninstrument
from gpas_probe.hf import layer_importance as hf_layer_importance
from gpas_probe.model import Transformer


class Target(Protocol):
    """A model to profile: its logits, its context length, its layer importance, and a context in which
    the probes can record it."""

    model: nn.Module

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor: ...
    def max_len(self) -> int | None: ...
    def importance(self, batches: Iterable[Batch], skip_first_position: bool) -> dict[str, pd.DataFrame]: ...
    def probed(self) -> AbstractContextManager[None]: ...


class NativeTarget:
    """Our :class:`~gpas_probe.model.Transformer`: hook points built in, deletion with prefix reuse."""

    def __init__(self, model: Transformer) -> None:
        self.model = model

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids).logits

    def max_len(self) -> int | None:
        return self.model.config.max_seq_len

    def importance(self, batches: Iterable[Batch], skip_first_position: bool) -> dict[str, pd.DataFrame]:
        return layer_importance(self.model, batches, normalize_rows=True, skip_first_position=skip_first_position)

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

    def importance(self, batches: Iterable[Batch], skip_first_position: bool) -> dict[str, pd.DataFrame]:
        return hf_layer_importance(self.model, batches, normalize_rows=True, skip_first_position=skip_first_position)

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
