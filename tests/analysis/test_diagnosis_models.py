"""Verdicts on models built for them, at 512, 2,048 and 16,384 evaluation tokens: the same verdict at every
size, or ``inconclusive`` at the small ones, never a confident flip.

- every layer matters: a 4-layer model trained until each layer's deletion costs clearly more than a
  quarter of the median layer's: never ``underuse``, and ``ok`` at 16,384 tokens;
- the same model with three layers appended whose branches are zero (exact identities): ``underuse``,
  naming exactly those three, at every size;
- the same model with a sink injected (one hidden dimension of position 0 driven to 100x the stream's RMS
  from layer 1 on, as trained LLMs' attention sinks): the finding names it, the verdict reads the
  statistics without it and stays ``ok``.
"""

from __future__ import annotations

import copy

import pytest
import torch

from gpas_probe import ModelConfig, TrainConfig, train
from gpas_probe.analysis import diagnose
from gpas_probe.analysis.diagnosis import Diagnosis
from gpas_probe.evaldata import load_eval_data
from gpas_probe.model import Transformer, build_model
from gpas_probe.profile import ProfileConfig, profile_model

SIZES = (512, 2048, 16384)
SEQ = 64


@pytest.fixture(scope="module")
def trained() -> Transformer:
    config = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=168, num_heads=4, num_layers=4,
                         max_seq_len=128)
    run = train(config, TrainConfig(steps=400, warmup=40, lr=3e-3, batch_size=16, seq_len=SEQ, eval_every=0,
                                    eval_batches=1))
    return run.model.eval()


@pytest.fixture(scope="module")
def data():
    return load_eval_data("builtin")


def _diagnose(model: torch.nn.Module, data, tokens: int) -> Diagnosis:
    windows = tokens // SEQ
    config = ProfileConfig.of(batches=max(1, windows // 8), batch_size=min(8, windows), seq_len=SEQ)
    return diagnose(profile_model(model, data, config, run_id="m"))


def _at_every_size(model: torch.nn.Module, data) -> dict[int, Diagnosis]:
    out = {tokens: _diagnose(model, data, tokens) for tokens in SIZES}
    confident = {d.verdict for d in out.values() if d.verdict != "inconclusive"}
    assert len(confident) <= 1, {t: d.verdict for t, d in out.items()}  # never a confident flip
    assert out[SIZES[-1]].verdict != "inconclusive"  # the largest size decides
    return out


def _zeroed(model: Transformer, extra: int) -> Transformer:
    config = copy.deepcopy(model.config)
    config.num_layers += extra
    big = build_model(config)
    big.load_state_dict({**big.state_dict(), **model.state_dict()})
    with torch.no_grad():
        for block in big.layers[model.config.num_layers:]:
            block.attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()
    return big.eval()


def _with_sink(model: Transformer, layer: int, dim: int, data) -> Transformer:
    sunk = copy.deepcopy(model)
    with torch.no_grad():
        ids = next(iter(data.batches(8, SEQ, 1)))[0]
        rms = float(sunk.hidden_states(ids).pow(2).mean().sqrt())

    def inject(_module, _args, out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        out[:, 0, dim] += 100 * rms
        return out

    sunk.layers[layer].hook_resid_post.register_forward_hook(inject)
    return sunk


def test_every_layer_matters(trained, data) -> None:
    out = _at_every_size(trained, data)
    assert all(d.verdict in ("ok", "inconclusive") for d in out.values())
    final = out[SIZES[-1]]
    assert final.verdict == "ok" and (final.layers["status"] == "used").all()
    assert final.summary["decided_by"] == "deletion" and final.summary["confidence"]["intervals"]
    assert final.summary["confidence"]["tokens"] == SIZES[-1]  # every window position has a target


def test_zeroed_layers_are_named_exactly(trained, data) -> None:
    out = _at_every_size(_zeroed(trained, 3), data)
    for d in out.values():
        assert d.verdict == "underuse" and d.summary["underused_layers"] == [4, 5, 6]
        zero = d.layers[d.layers["layer"] >= 4]
        assert (zero[["deletion_delta", "deletion_lo", "deletion_hi"]] == 0).all().all()  # exactly, every sequence


def test_an_injected_sink_is_a_finding_and_changes_no_verdict(trained, data) -> None:
    out = _at_every_size(_with_sink(trained, layer=1, dim=5, data=data), data)
    assert out[SIZES[-1]].verdict == "ok"
    for d in out.values():
        finding = d.summary["findings"]["massive_activations"]
        assert (finding["from_layer"], finding["dimension"], finding["position"]) == (1, 5, 0)
        assert finding["first_position_windows"] == 1.0 and "every window" in finding["text"]
        assert d.summary["statistics_read"]["variance"] == "var_robust"
        assert d.layers["var_rel"].max() < 4  # without the sink the variance does not jump
