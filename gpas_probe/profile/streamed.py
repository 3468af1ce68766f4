"""Profiles of models larger than memory: one decoder layer's weights in memory at a time.

``LoadSpec(stream=True)`` (``gpas-probe profile --stream``) reads a natively loadable checkpoint's
safetensors files memory-mapped (:class:`LazyWeights`) into a model skeleton on the meta device, filling
one module at a time and emptying it after use. Every evaluation batch goes through each layer before
the next layer is read, so each layer's weights are read once per sweep:

- **forward sweep** (no gradients): the residual stream ``h_l`` of every batch is kept at every layer
  boundary; exact deletion advances all "layer ``k`` deleted" streams together (the stream for ``k``
  starts at ``h_k`` and goes through every later layer with the others), so the arithmetic is that of
  prefix reuse; the head then gives each stream's loss;
- **reverse sweep** (for the statistics or the deletion estimate): from the gradient at the last layer's
  output, each layer is recomputed on its kept input with gradients and backpropagated, batch by batch;
  a probe armed on that layer alone records its forward and backward statistics, gradient and weight
  norms and gates exactly as the in-memory profile does (:mod:`gpas_probe.profile.measure`).

The model-level ``grad_norm`` adds the layers', the head's and the embedding's gradients (the embedding's
is the gradient at layer 0's input summed per token, so only the rows of tokens present are formed).
The rows equal the in-memory profile's.

Memory: the largest module's weights (the embedding, the head with its gradient, or one layer with its
gradient) and, for the N evaluation tokens at once, ``(L + 1) · N · hidden`` kept states plus up to
``L · N · hidden`` deletion streams during the forward sweep. Checkpoints that load only with
transformers (GGUF, other architectures) and ``pytorch_model.bin`` weights cannot stream.
"""

from __future__ import annotations

import ctypes
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import torch
from torch import nn

from gpas_probe.analysis.importance import head_of
from gpas_probe.analysis.passes import Head, add_pass, first_order_delta, loss_per_sequence, summed_loss
from gpas_probe.analysis.streaming import unpack_batch
from gpas_probe.checkpoints import read_config, resolve_checkpoint
from gpas_probe.checkpoints.foreign import config_from_hf
from gpas_probe.checkpoints.layout import parameter_map
from gpas_probe.checkpoints.lazy import LazyWeights
from gpas_probe.checkpoints.native import is_native
from gpas_probe.checkpoints.steps import checkpoint_step
from gpas_probe.config import ModelConfig
from gpas_probe.evaldata import EvalData
from gpas_probe.model import Transformer, build_model
from gpas_probe.probes import FAMILIES
from gpas_probe.profile.config import ProfileConfig
from gpas_probe.profile.measure import importance_rows, importance_sums, profile_probe
from gpas_probe.store.schema import MODEL_LAYER, MODEL_SITE, as_table_frame

log = logging.getLogger(__name__)

try:
    _LIBC: ctypes.CDLL | None = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None
    _LIBC and _LIBC.malloc_trim  # noqa: B018 (glibc only)
except (OSError, AttributeError):
    _LIBC = None


@dataclass
class StreamedCheckpoint:
    """A checkpoint opened for streaming: ``model`` is a skeleton on the meta device (``model.config``),
    ``config`` the parsed ``config.json``, ``keys`` each parameter name's tensor key."""

    path: Path
    config: dict[str, Any]
    step: int | None
    model: Transformer
    weights: LazyWeights
    keys: dict[str, str]
    dtype: torch.dtype
    device: torch.device

    @contextmanager
    def filled(self, *modules: nn.Module, grad: bool = False) -> Iterator[None]:
        """``modules`` (of ``model``) with their weights in memory for the block (read into one buffer),
        empty again after it."""
        names = {id(m): n for n, m in self.model.named_modules()}
        slots = [(sub, name, self.keys[f"{path}.{name}"]) for m in modules
                 for path, sub in m.named_modules(prefix=names[id(m)])
                 for name, p in sub.named_parameters(recurse=False)]
        keys = list(dict.fromkeys(key for _, _, key in slots))  # a tied head shares the embedding's
        tensors = self.weights.read(keys, self.dtype, self.device)
        params = {k: nn.Parameter(t, requires_grad=grad) for k, t in zip(keys, tensors, strict=True)}
        originals = [(sub, name, sub._parameters[name]) for sub, name, _ in slots]
        try:
            for sub, name, key in slots:
                sub._parameters[name] = params[key]
            del tensors, params
            yield
        finally:
            for sub, name, meta in originals:
                sub._parameters[name] = meta
            _trim()


def open_streamed(path: str | Path, *, backend: str = "auto", norm: str | None = None,
                  post_layers: int | None = None, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> StreamedCheckpoint:
    """Open a checkpoint for :func:`profile_streamed`: its configuration and tensor index, no weights."""
    ckpt = resolve_checkpoint(path)
    if backend == "hf":
        raise ValueError(f"{ckpt}: streaming profiles natively loaded checkpoints only, not with transformers")
    cfg = read_config(ckpt)
    weights = LazyWeights(ckpt)
    if is_native(cfg):
        config = ModelConfig.from_dict(cfg["gpas_probe"]["model_config"])
    else:
        try:
            config = config_from_hf(cfg, weights.keys(), norm, post_layers)
        except ValueError as e:
            raise ValueError(f"{ckpt}: {e} (streaming profiles natively loadable checkpoints only)") from None
    with torch.device("meta"):
        model = build_model(config)
    stored = weights.dtype("model.embed_tokens.weight") if dtype is None else dtype
    model = model.to(dtype=stored).eval()
    if config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rotary.to_empty(device=device or "cpu")
    by_id = {id(p): key for key, p in parameter_map(model).items()}
    keys = {name: by_id[id(p)] for name, p in model.named_parameters(remove_duplicate=False) if id(p) in by_id}
    missing = sorted(set(by_id.values()) - set(weights.keys()))
    if missing:
        raise ValueError(f"{ckpt}: missing weights, e.g. {missing[:3]} ({len(missing)} in all)")
    return StreamedCheckpoint(ckpt, cfg, checkpoint_step(ckpt, cfg), model, weights, keys, stored,
                              torch.device(device or "cpu"))


def _trim() -> None:
    """Give the heap's freed memory back to the system (glibc), so that reading one layer after another
    does not make the process grow with every layer (elsewhere a no-op)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _sq(t: torch.Tensor | None) -> torch.Tensor:
    """The squared norm in float64, a block of rows at a time (no float64 copy of a whole head)."""
    if t is None:
        return torch.zeros((), dtype=torch.float64)
    return sum((part.double().square().sum() for part in t.reshape(-1).split(1 << 20)),
               torch.zeros((), dtype=torch.float64, device=t.device))


def _head_gradient(head: Head, h: torch.Tensor, labels: torch.Tensor, n_targets: int) -> torch.Tensor:
    """The gradient of the summed loss over ``n_targets`` at the last layer's output ``h`` (the head's
    parameters get theirs); nothing of the pass outlives the call."""
    x = h.detach().requires_grad_()
    (summed_loss(head(x), labels) / n_targets).backward()
    assert x.grad is not None
    return x.grad


def profile_streamed(sc: StreamedCheckpoint, data: EvalData, config: ProfileConfig, *, step: int = 0,
                     run_id: str = "profile", on_unit: Callable[[str], None] | None = None) -> pd.DataFrame:
    """The profile rows of a streamed checkpoint (module doc); ``on_unit(phase)`` after each layer of each
    sweep and after the head: ``L + 1`` units, ``2L + 1`` with a reverse sweep."""
    model, measure, sizes = sc.model, config.measure, config.evaluation.sizes
    data.check_vocab(model.config.vocab_size)
    L, n_targets = model.config.num_layers, data.num_targets(*sizes)
    batches = [unpack_batch(b, sc.device) for b in data.batches(*sizes)]
    backward = measure.activations or measure.estimate
    tell = on_unit or (lambda _phase: None)
    with torch.no_grad(), sc.filled(model.embed_tokens):
        states = [[model.embed_tokens(ids) for ids, _, _ in batches]]
    cos, sin = model.rotary(batches[0][0].shape[1], sc.dtype)
    streams: dict[int, list[torch.Tensor]] = {}
    with torch.no_grad():
        for layer, block in enumerate(model.layers):
            with sc.filled(block):
                states.append([block(x, cos, sin) for x in states[layer]])
                if measure.exact:
                    streams = {k: [block(x, cos, sin) for x in s] for k, s in streams.items()}
                    streams[layer] = states[layer]  # layer deleted: the stream goes on from its input
            tell("forward sweep")
    head_modules = (model.embed_tokens, model.norm, model.lm_head) if model.config.tie_embeddings else (
        model.norm, model.lm_head)
    grads: list[torch.Tensor] = []
    grad_sq = torch.zeros((), dtype=torch.float64, device=sc.device)  # the global gradient norm's square
    head = head_of(model)
    with sc.filled(*head_modules, grad=measure.activations):
        with torch.no_grad():
            base = [loss_per_sequence(head, states[L][b], labels) for b, (_, labels, _) in enumerate(batches)]
            deleted = {k: [loss_per_sequence(head, s[b], batches[b][1]) for b in range(len(batches))]
                       for k, s in streams.items()}
        streams.clear()
        if backward:
            grads = [_head_gradient(head, states[L][b], labels, n_targets) for b, (_, labels, _) in enumerate(batches)]
        head_grad = model.lm_head.weight.grad
        if head_grad is not None:  # the head's (and a tied embedding's) gradient rows at the input tokens
            tokens = torch.unique(torch.cat([ids.flatten() for ids, _, _ in batches]))
            head_rows = head_grad[tokens].double()
            grad_sq += _sq(head_grad) + _sq(model.norm.weight.grad)
            del head_grad
        for m in head_modules:
            m.zero_grad(set_to_none=True)
    tell("head")
    frames: list[pd.DataFrame] = []
    estimates: list[list[torch.Tensor]] = [[] for _ in range(L)]
    for layer in reversed(range(L if backward else 0)):
        block = model.layers[layer]
        with sc.filled(block, grad=measure.activations):
            # a probe on this layer alone; the model-level rows are made below
            stats = tuple(s for s in FAMILIES if s != "model")
            probe = profile_probe(nn.ModuleList([block]), config, run_id, stats) if measure.activations else None
            if probe is not None:
                probe.begin_step(step)
            below = []
            for b, (ids, _, mask) in enumerate(batches):
                if probe is not None:
                    probe.set_exclude_mask(~mask)
                    probe.set_tokens(ids)
                x = states[layer][b].detach().requires_grad_()
                with torch.enable_grad():
                    block(x, cos, sin).backward(grads[b])
                if measure.estimate:
                    estimates[layer].append(first_order_delta(grads[b], states[layer][b], states[layer + 1][b],
                                                              n_targets))
                below.append(x.grad)
            if measure.activations:
                grad_sq += sum(_sq(p.grad) for p in block.parameters())
            if probe is not None:
                probe.after_backward(step)
                probe.end_step(SimpleNamespace(step=step, val_loss=None, tokens=n_targets, sequences=None))
                frame = probe.frame()
                frames.append(frame[frame["stat"] != "update_ratio"])
                probe.close()
                probe = None  # it holds the layer's parameters
            block.zero_grad(set_to_none=True)
            grads = below
        tell("reverse sweep")
    sequences = sum(len(ids) for ids, _, _ in batches)
    model_rows: dict[str, float] = {"tokens": n_targets, "sequences": sequences} if measure.activations else {}
    if measure.activations:  # the embedding's gradient: the gradient at layer 0's input, summed per token
        ids = torch.cat([i.flatten() for i, _, _ in batches])
        rows = torch.zeros_like(head_rows).index_add_(0, torch.searchsorted(tokens, ids),
                                                      torch.cat([g.flatten(0, 1) for g in grads]).double())
        if model.config.tie_embeddings:  # one tensor: its rows at these tokens hold both gradients
            rows += head_rows
            grad_sq -= _sq(head_rows)
        model_rows["grad_norm"] = float((grad_sq + _sq(rows)).sqrt())
    if not measure.importance:
        model_rows["val_loss"] = float(sum(x.sum() for x in base)) / n_targets
    frames.insert(0, pd.DataFrame([{"run_id": run_id, "step": step, "layer": MODEL_LAYER, "site": MODEL_SITE,
                                    "direction": "none", "stat": k, "value": float(v)}
                                   for k, v in model_rows.items()]))
    if measure.importance:
        sums = importance_sums(config, L)
        for b, (_, labels, mask) in enumerate(batches):
            capture = SimpleNamespace(layers=range(L), states=[s[b] for s in states],
                                      estimates=[e[b] for e in estimates] if measure.estimate else [])
            add_pass(sums, capture, labels, mask, base[b], None)  # type: ignore[arg-type]
            for k, losses in deleted.items():
                sums.add_deleted(k, losses[b])
            sums.end_batch()
        frames += importance_rows(sums, run_id, step)
    return as_table_frame(pd.concat(frames, ignore_index=True))
