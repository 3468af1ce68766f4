"""Per-token rows of a pass against plain torch math: one row per distinct tensor, the reductions over
kept tokens, the medians outliers are found with, where the largest |x| sits, and pooling over passes."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from probe_reference import batch, model_for, rows

from gpas_probe.probes import Probe, ProbeConfig
from gpas_probe.probes.tokens import TokenRows


def _x(seed: int, b: int = 3, t: int = 5, h: int = 8, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(b, t, h, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("masked", [False, True])
def test_rows_reduce_each_distinct_tensor_once_and_match_plain_math(masked: bool) -> None:
    xs = [_x(i) * (i + 1) + i for i in range(5)]
    keep = torch.rand(3, 5, generator=torch.Generator().manual_seed(9)) > 0.3 if masked else None
    rows = TokenRows(xs[0], keep, capacity=2, locate=True)  # grows past its capacity
    scratch = torch.empty_like(xs[0])
    got = [rows.row(x, scratch, forward=True) for x in xs]
    assert got == [0, 1, 2, 3, 4] and rows.row(xs[2], scratch, forward=True) == 2  # the same tensor: its row
    xs[1].mul_(2)  # changed in place: a new row
    assert rows.row(xs[1], scratch, forward=True) == 5
    k = torch.ones(3, 5, dtype=torch.bool) if keep is None else keep
    s, medians = rows.summary(), rows.medians()
    for r, x in enumerate([*xs[:1], xs[1] / 2, *xs[2:], xs[1]]):
        kept = x[k]
        assert float(s.dev_sq[r]) == pytest.approx(float(((kept - kept.mean(-1, keepdim=True)) ** 2).sum()), rel=1e-12)
        assert float(s.mean_sq[r]) == pytest.approx(float(kept.mean(-1).pow(2).sum()), rel=1e-12)
        assert float(s.absmax[r]) == float(kept.abs().max())
        lower_middle = sorted(kept.pow(2).mean(-1).tolist())[(len(kept) - 1) // 2]
        assert float(medians[r]) == pytest.approx(lower_middle, rel=1e-12)
        biggest = x.abs().masked_fill(~k[..., None], -1.0)
        b, t, h = (int(i) for i in torch.nonzero(biggest == biggest.max())[0])
        assert rows.loc[r].tolist() == [b * 5 + t, h]
    assert int(s.n) == int(k.sum())


def test_location_ties_pick_the_first_token_and_dimension() -> None:
    x = torch.zeros(2, 3, 4)
    x[0, 2, 3], x[1, 0, 1], x[0, 2, 1] = -7.0, 7.0, 7.0
    rows = TokenRows(x, None, capacity=1, locate=True)
    rows.row(x, torch.empty_like(x), forward=True)
    assert rows.loc[0].tolist() == [2, 1]  # token (0, 2) comes first; there dimension 1 before 3


@pytest.mark.parametrize(("low", "high", "want"), [
    ((0, 3, 2, -9.0), (0, 1, 0, 7.0), [3, 2]),  # the smallest value is the largest |x|: its token
    ((0, 3, 2, -7.0), (0, 1, 0, 7.0), [1, 0]),  # equal |x| at two tokens: the first token, largest first
    ((0, 1, 2, -7.0), (0, 3, 0, 7.0), [1, 2]),  # ... also when it holds the smallest value
])
def test_location_between_the_largest_and_the_smallest_value(low: tuple, high: tuple, want: list[int]) -> None:
    x = torch.zeros(1, 5, 4)
    for b, t, h, v in (low, high):
        x[b, t, h] = v
    rows = TokenRows(x, None, capacity=1, locate=True)
    rows.row(x, torch.empty_like(x), forward=True)
    assert rows.loc[0].tolist() == want


def test_location_skips_tokens_left_out() -> None:
    x = torch.zeros(1, 4, 3)
    x[0, 0, 1], x[0, 2, 2], x[0, 3, 0] = 100.0, -5.0, 4.0
    keep = torch.tensor([[False, True, True, True]])
    rows = TokenRows(x, keep, capacity=1, locate=True)
    rows.row(x, torch.empty_like(x), forward=True)
    assert rows.loc[0].tolist() == [2, 2]


def test_a_token_left_out_cannot_spoil_the_sums_even_when_infinite() -> None:
    x = _x(3)
    x[0, 0] = math.inf
    keep = torch.ones(3, 5, dtype=torch.bool)
    keep[0, 0] = False
    rows = TokenRows(x, keep, capacity=1, locate=False)
    rows.row(x, torch.empty_like(x), forward=True)
    s = rows.summary()
    assert all(math.isfinite(float(v)) for v in (s.dev_sq[0], s.mean_sq[0], s.absmax[0]))


def test_passes_of_a_step_pool_as_their_sums() -> None:
    """A step of two forward/backward passes records the pooled counts of both, and the location of the
    larger of the two maxima."""
    model = model_for(torch.float64, gpas=True)
    (xa, ya), (xb, yb) = batch(1), batch(2)
    cfg = ProbeConfig(every=1, stats=("activations", "outliers"), outlier_factor=1.2, intervals=True)

    def record(*passes) -> dict:
        with Probe(model, config=cfg) as probe:
            probe.begin_step(1)
            for x, y in passes:
                probe.set_tokens(x)
                model(x, y).loss.backward()
            probe.end_step(SimpleNamespace(step=1))
            return rows(probe.frame())

    a, b, both = record((xa, ya)), record((xb, yb)), record((xa, ya), (xb, yb))
    assert any(v > 0 for k, v in both.items() if k[3] == "outlier_frac")
    for key in [k for k in both if k[3] == "outlier_frac"]:  # both passes have as many tokens
        assert both[key] == pytest.approx((a[key] + b[key]) / 2, rel=1e-12)
        site = key[:3]
        winner = a if a[site + ("absmax",)] >= b[site + ("absmax",)] else b
        assert both[site + ("absmax_pos",)] == winner[site + ("absmax_pos",)]
        assert both[site + ("absmax_token",)] == winner[site + ("absmax_token",)]
