"""The first-order deletion estimate (``deletion_estimate``) against its definition computed by brute force
with autograd: for each layer ``l``, the gradient of the summed loss with respect to the layer's output
``h_{l+1}``, dotted with ``h_l - h_{l+1}`` (the change deleting the layer makes there), over the number of
target tokens; for our model and a Hugging Face LLaMA, and alongside exact deletion (``both``)."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gpas_probe.config import ModelConfig
from gpas_probe.evaldata import EvalData
from gpas_probe.model import build_model
from gpas_probe.profile import ProfileConfig, profile_model

SEQ, BS, NB = 12, 2, 2


def _data(vocab: int, seed: int = 3) -> EvalData:
    tokens = np.random.default_rng(seed).integers(0, vocab, BS * SEQ * NB + 1).astype(np.int64)
    return EvalData("random", tokens, "tokens", "random")


def _layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return list(model.layers) if hasattr(model, "layers") else list(model.model.layers)


def _enter(states: list, _module, args, kwargs) -> None:
    states.append(args[0] if args else kwargs["hidden_states"])


def _leave(states: list, _module, _args, out) -> None:
    states.append(out[0] if isinstance(out, tuple) else out)


def _brute_force(model: torch.nn.Module, data: EvalData) -> np.ndarray:
    """Per layer: sum over batches of grad(sum loss, h_{l+1}) . (h_l - h_{l+1}), over all target tokens."""
    layers = _layers(model)
    total, targets = np.zeros(len(layers)), 0
    for ids, labels, _ in data.batches(BS, SEQ, NB):
        states: list[torch.Tensor] = []
        handles = [layer.register_forward_pre_hook(partial(_enter, states), with_kwargs=True) for layer in layers]
        handles.append(layers[-1].register_forward_hook(partial(_leave, states)))
        try:
            logits = model(ids).logits
        finally:
            for h in handles:
                h.remove()
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum", ignore_index=-100)
        grads = torch.autograd.grad(loss, states[1:])
        for layer in range(len(layers)):
            total[layer] += float((grads[layer] * (states[layer] - states[layer + 1])).detach().double().sum())
        targets += int((labels != -100).sum())
    return total / targets


def _rows(frame, stat: str) -> np.ndarray:
    rows = frame[(frame["stat"] == stat) & (frame["layer"] >= 0)].sort_values("layer")
    return rows["value"].to_numpy(dtype=float)


@pytest.mark.parametrize("deletion", ["estimate", "both"])
def test_estimate_of_our_model_is_its_definition(deletion: str) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_preset("tiny", num_layers=4)).double().eval()
    data = _data(model.config.vocab_size)
    frame = profile_model(model, data, ProfileConfig.of(batches=NB, batch_size=BS, seq_len=SEQ, deletion=deletion,
                                                        activations=deletion == "both"))
    expected = _brute_force(model, data)
    np.testing.assert_allclose(_rows(frame, "deletion_estimate"), expected, rtol=1e-8, atol=1e-12)
    lo, hi = _rows(frame, "deletion_estimate_lo"), _rows(frame, "deletion_estimate_hi")
    assert (lo <= expected + 1e-12).all() and (expected <= hi + 1e-12).all() and (lo < hi).all()
    if deletion == "both":
        assert len(_rows(frame, "deletion_delta")) == 4
    else:
        assert len(_rows(frame, "deletion_delta")) == 0
    assert not any(p.grad is not None for p in model.parameters())  # the estimate left no gradients behind


def test_estimate_of_a_hugging_face_llama_is_its_definition() -> None:
    pytest.importorskip("transformers")
    from tests.hf_models import tiny_llama

    model = tiny_llama(layers=3).double()
    data = _data(model.config.vocab_size)
    frame = profile_model(model, data, ProfileConfig.of(batches=NB, batch_size=BS, seq_len=SEQ, deletion="both",
                                                        activations=False))
    # transformers' RMSNorm computes in float32 even in a float64 model: the profile's backward of sum/N and
    # this one of the sum round differently there, at float32's 1e-7
    np.testing.assert_allclose(_rows(frame, "deletion_estimate"), _brute_force(model, data), rtol=1e-5, atol=1e-12)


def test_estimate_follows_exact_deletion_for_a_small_layer() -> None:
    """First order: when a layer's contribution is scaled down, exact Δloss and the estimate converge."""
    torch.manual_seed(1)
    model = build_model(ModelConfig.from_preset("tiny")).double().eval()
    with torch.no_grad():
        for layer in model.layers:
            for p in layer.parameters():
                if p.dim() == 2:
                    p.mul_(0.05)
    data = _data(model.config.vocab_size)
    frame = profile_model(model, data, ProfileConfig.of(batches=NB, batch_size=BS, seq_len=SEQ, deletion="both",
                                                        activations=False))
    exact, estimate = _rows(frame, "deletion_delta"), _rows(frame, "deletion_estimate")
    np.testing.assert_allclose(estimate, exact, rtol=0.1, atol=1e-6)
