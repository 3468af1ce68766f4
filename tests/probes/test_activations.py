"""Activation statistics (``var``, ``rms``, ``absmax``, forward and backward) against their brute-force twin."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from probe_reference import B, T, assert_rows, batch, family_case, model_for

from gpas_probe.probes import Probe, ProbeConfig
from gpas_probe.probes.tokens import TokenRows


def test_activation_statistics_match_brute_force(case: str, grads_at_backward_end: bool) -> None:
    got, exp, rtol = family_case("activations", case, grads_at_backward_end)
    assert_rows(got, exp, rtol)


def test_a_step_with_every_token_excluded_records_nan_and_is_not_called_non_finite() -> None:
    model = model_for()
    with Probe(model, config=ProbeConfig(every=1, stats=("activations",))) as probe:
        probe.set_exclude_mask(torch.ones(B, T, dtype=torch.bool))
        probe.begin_step(1)
        model(*batch(7)).loss.backward()
        probe.end_step(SimpleNamespace(step=1))
        frame = probe.frame()
        assert probe.first_non_finite() is None
    assert len(frame) and frame["value"].isna().all()  # var, rms and absmax of no token: undefined


def test_large_finite_activations_give_finite_moments() -> None:
    x = torch.randn(2, 64, 4096, generator=torch.Generator().manual_seed(0)) + 1e15  # a diverging run's scale
    for keep in (None, torch.ones(2, 64, dtype=torch.bool)):
        rows = TokenRows(x, keep, capacity=1, locate=False)
        rows.row(x, torch.empty_like(x), forward=True)
        m = rows.summary()
        assert all(math.isfinite(float(v)) for v in (m.n, *m.dev_sq, *m.mean_sq, *m.absmax))
        rms = math.sqrt((float(m.dev_sq[0]) + 4096 * float(m.mean_sq[0])) / (float(m.n) * 4096))
        assert rms == pytest.approx(1e15, rel=1e-3)
