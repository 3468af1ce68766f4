"""Confidence intervals (``gpas_probe.intervals``): the t quantile against its distribution function
integrated numerically, the ratio estimator's interval against a per-sequence computation, and the
coverage the intervals promise, on data drawn with a known truth."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gpas_probe.intervals import mean_interval, ratio_interval, sqrt_interval, t_quantile


def _t_cdf(q: float, dof: float) -> float:
    """P(T <= q) by Simpson's rule on the density (the brute-force twin of t_quantile)."""
    c = math.gamma((dof + 1) / 2) / (math.sqrt(dof * math.pi) * math.gamma(dof / 2))
    xs = np.linspace(0.0, q, 200_001)
    ys = c * (1 + xs**2 / dof) ** (-(dof + 1) / 2)
    h = xs[1] - xs[0]
    return 0.5 + h / 3 * (ys[0] + ys[-1] + 4 * ys[1:-1:2].sum() + 2 * ys[2:-1:2].sum())


@pytest.mark.parametrize("dof", [1, 2, 3, 4, 5, 10, 30, 200])
@pytest.mark.parametrize("p", [0.9, 0.975, 0.995])
def test_t_quantile_inverts_the_distribution_function(dof: int, p: float) -> None:
    q = t_quantile(p, dof)
    assert _t_cdf(q, dof) == pytest.approx(p, abs=1e-9)
    assert t_quantile(1 - p, dof) == pytest.approx(-q)


def test_known_values() -> None:
    for dof, want in ((3, 3.182446), (5, 2.570582), (10, 2.228139), (30, 2.042272)):
        assert t_quantile(0.975, dof) == pytest.approx(want, abs=1e-6)


def test_ratio_interval_is_the_per_sequence_computation() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(5, 40, size=17).astype(float)
    x = y * 2.5 + rng.normal(0, 3, size=17)
    got = ratio_interval(len(x), x.sum(), y.sum(), (x * x).sum(), (y * y).sum(), (x * y).sum())
    r = x.sum() / y.sum()
    residuals = [xj - r * yj for xj, yj in zip(x, y, strict=True)]
    se = math.sqrt(len(x) / (len(x) - 1) * sum(e * e for e in residuals)) / y.sum()
    assert got.estimate == pytest.approx(r) and got.se == pytest.approx(se, rel=1e-9)
    assert (got.lo, got.hi) == pytest.approx((r - t_quantile(0.975, 16) * se, r + t_quantile(0.975, 16) * se))
    mean = mean_interval(len(x), x.sum(), (x * x).sum())
    assert mean.estimate == pytest.approx(x.mean()) and mean.se == pytest.approx(x.std(ddof=1) / math.sqrt(17))


def test_too_few_sequences_or_no_data_give_no_bounds() -> None:
    one = ratio_interval(1, 3.0, 2.0, 9.0, 4.0, 6.0)
    assert one.estimate == 1.5 and math.isnan(one.lo) and math.isnan(one.hi)
    none = ratio_interval(5, 0.0, 0.0, 0.0, 0.0, 0.0)
    assert math.isnan(none.estimate) and math.isnan(none.lo)
    exact = ratio_interval(4, 0.0, 8.0, 0.0, 16.0, 0.0)  # every sequence exactly 0: a zero-width interval
    assert (exact.estimate, exact.lo, exact.hi) == (0.0, 0.0, 0.0)


@pytest.mark.parametrize("m", [4, 12, 40])
def test_intervals_cover_the_truth_as_often_as_they_promise(m: int) -> None:
    rng = np.random.default_rng(m)
    truth, covered, trials = 1.7, 0, 4000
    for _ in range(trials):
        y = rng.integers(20, 60, size=m).astype(float)  # tokens per sequence
        x = truth * y + rng.normal(0.0, 4.0, size=m) * np.sqrt(y)  # per-sequence sums around the truth
        iv = ratio_interval(m, x.sum(), y.sum(), (x * x).sum(), (y * y).sum(), (x * y).sum())
        covered += iv.lo <= truth <= iv.hi
    assert 0.93 <= covered / trials <= 0.97


def test_sqrt_interval_maps_the_bounds() -> None:
    iv = sqrt_interval(ratio_interval(10, 40.0, 10.0, 170.0, 10.0, 40.0))
    assert iv.estimate == pytest.approx(2.0)
    assert iv.lo <= 2.0 <= iv.hi and iv.lo == pytest.approx(math.sqrt(max(4.0 - (4.0 - iv.lo**2), 0)))
