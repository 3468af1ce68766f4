"""Outlier tokens (sinks, massive activations) and the statistics without them, against their brute-force twin."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from probe_reference import CASES, assert_rows, batch, family_case, model_for, rows

from gpas_probe.probes import Probe, ProbeConfig


def test_outlier_statistics_match_brute_force(case: str, grads_at_backward_end: bool) -> None:
    got, exp, rtol = family_case("outliers", case, grads_at_backward_end)
    assert_rows(got, exp, rtol)
    if CASES[case][5].get("outlier_factor", 10.0) < 2:  # the low factors flag some tokens: robust != raw
        assert any(v > 0 for k, v in got.items() if k[3] == "outlier_frac")


def _sink_model(layer: int = 1, dim: int = 7, value: float = 1e4) -> torch.nn.Module:
    """A tiny model whose residual stream gets a massive activation at position 0, in one hidden
    dimension, from layer ``layer`` on (as a trained LLM's attention sink)."""
    model = model_for(torch.float64, gpas=True)

    def inject(_m, _a, out):
        out = out.clone()
        out[:, 0, dim] += value
        return out

    model.layers[layer].hook_resid_post.register_forward_hook(inject)
    return model


def _record(model: torch.nn.Module, **options) -> dict:
    x, y = batch(4, b=5, t=16)
    with Probe(model, config=ProbeConfig(every=1, stats=("activations", "outliers"), **options)) as probe:
        probe.set_tokens(x)
        probe.begin_step(1)
        model(x, y).loss.backward()
        probe.end_step(SimpleNamespace(step=1))
        return rows(probe.frame())


def test_a_sink_token_is_found_where_it_is_and_left_out_of_the_robust_statistics() -> None:
    model = _sink_model(layer=1, dim=7)
    got = _record(model)
    without_first = _record(model, skip_first_position=True)
    x, _ = batch(4, b=5, t=16)
    for layer in (1, 2, 3):
        key = (layer, "resid_post", "fwd")
        assert (got[key + ("absmax_pos",)], got[key + ("absmax_dim",)]) == (0, 7)
        assert got[key + ("absmax_token",)] in set(x[:, 0].tolist())
        assert got[key + ("outlier_pos0_frac",)] == 1.0 and got[key + ("outlier_frac",)] == pytest.approx(1 / 16)
        assert got[key + ("outlier_var_share",)] > 0.99  # the sink carries the variance...
        assert got[key + ("var",)] > 100 * got[key + ("var_robust",)]  # ...and the raw var with it
        # without the sink, the robust statistics are those of the other positions
        assert got[key + ("var_robust",)] == pytest.approx(without_first[key + ("var",)], rel=1e-9)
        assert got[key + ("rms_robust",)] == pytest.approx(without_first[key + ("rms",)], rel=1e-9)
    before = (0, "resid_post", "fwd")
    assert got[before + ("outlier_frac",)] == 0.0
    assert got[before + ("var_robust",)] == pytest.approx(got[before + ("var",)])
