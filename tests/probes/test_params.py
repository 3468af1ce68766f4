"""Per-layer parameter statistics (gradient norm, weight norm, update ratio) against their brute-force twin."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from probe_reference import assert_rows, batch, family_case, model_for, norm, rows

from gpas_probe.probes import Driver, Probe, ProbeConfig


def test_parameter_statistics_match_brute_force(case: str, grads_at_backward_end: bool) -> None:
    got, exp, rtol = family_case("params", case, grads_at_backward_end)
    assert_rows(got, exp, rtol)


def test_parameter_statistics_of_a_bf16_model_match_float64(grads_at_backward_end: bool) -> None:
    model = model_for(torch.bfloat16, gpas=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    with Probe(model, config=ProbeConfig(every=1, stats=("params",)),
               driver=Driver(grads_at_backward_end=grads_at_backward_end)) as probe:
        probe.begin_step(1)
        model(*batch(3)).loss.backward()
        probe.after_backward(1)
        grads = {p: p.grad.double() for p in params}
        before = {p: p.detach().double() for p in params}
        opt.step()  # bf16 weights: the update is rounded to bf16, and read back exactly
        probe.end_step(SimpleNamespace(step=1))
        got = rows(probe.frame())
    for block in model.layers:
        ps = [p for p in block.parameters() if p.requires_grad]
        w = norm(before[p] for p in ps)
        exp = {"grad_norm": norm(grads[p] for p in ps), "weight_norm": w,
               "update_ratio": norm(p.detach().double() - before[p] for p in ps) / w}
        for stat, value in exp.items():
            assert got[(block.layer, "params", "none", stat)] == pytest.approx(value, rel=1e-5), stat
