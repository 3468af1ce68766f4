"""Confidence intervals of statistics pooled over evaluation sequences.

Every per-layer signal of a profile is a *ratio* of sums over sequences: a mean loss is the summed loss
over the summed target count, a variance the summed squared deviation over the summed token count, a
mean over sequences a sum over their number. Sequences (evaluation windows) are the independent units;
tokens within one are not. So each signal keeps, besides its sums ``X = Σ x_j`` and ``Y = Σ y_j`` over
the ``m`` sequences ``j``, the second moments ``Σ x_j²``, ``Σ y_j²`` and ``Σ x_j y_j`` (all additive:
batches and ranks stream into them), and its interval is the ratio estimator's:

    R = X / Y,   SE² = m / (m - 1) · Σ (x_j - R y_j)² / Y²,   R ± t(m - 1) · SE

(the delta method for a ratio of means; ``Σ (x_j - R y_j)² = Σx² - 2R Σxy + R² Σy²``). A mean over
sequences is the case ``y_j = 1``. ``t(m - 1)`` is Student's t quantile, so few sequences give wide
intervals; fewer than two give none (NaN bounds).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

#: The confidence level of every interval the toolkit reports.
LEVEL = 0.95


def t_cdf(t: float, dof: int) -> float:
    """Student's t distribution function for an integer ``dof``, by the finite series in ``cos(θ)``,
    ``θ = atan(t / sqrt(dof))`` (Abramowitz & Stegun 26.7.3-4)."""
    theta = math.atan(t / math.sqrt(dof))
    c2, sin = math.cos(theta) ** 2, math.sin(theta)
    if dof % 2:  # odd: (2/π)(θ + sinθ cosθ (1 + 2/3 cos² + 2·4/(3·5) cos⁴ + ...))
        term, total = 1.0, 1.0 if dof > 1 else 0.0
        for k in range(1, (dof - 1) // 2):
            term *= 2 * k / (2 * k + 1) * c2
            total += term
        a = 2 / math.pi * (theta + sin * math.cos(theta) * total)
    else:  # even: sinθ (1 + 1/2 cos² + 1·3/(2·4) cos⁴ + ...)
        term, total = 1.0, 1.0
        for k in range(1, dof // 2):
            term *= (2 * k - 1) / (2 * k) * c2
            total += term
        a = sin * total
    return 0.5 + a / 2


def t_quantile(p: float, dof: float) -> float:
    """Student's t quantile: ``P(T <= q) = p`` for ``dof`` degrees of freedom. The Cornish-Fisher
    expansion to fourth order, refined by Newton steps on :func:`t_cdf` for integer ``dof`` up to 10,000
    (beyond, the expansion alone is exact to float precision)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if dof <= 0 or math.isnan(dof):
        return math.nan
    if dof == 1:
        return math.tan(math.pi * (p - 0.5))
    if dof == 2:
        return (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    z = NormalDist().inv_cdf(p)
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    q = z + g1 / dof + g2 / dof**2 + g3 / dof**3 + g4 / dof**4
    if float(dof).is_integer() and dof <= 10_000:
        norm = math.exp(math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2)) / math.sqrt(dof * math.pi)
        for _ in range(3):
            density = norm * (1 + q * q / dof) ** (-(dof + 1) / 2)
            q -= (t_cdf(q, int(dof)) - p) / density
    return q


@dataclass(frozen=True)
class Interval:
    """An estimate with its standard error and ``level`` interval ``[lo, hi]`` from ``n`` sequences."""

    estimate: float
    lo: float
    hi: float
    se: float
    n: int

    def excludes(self, value: float) -> bool:
        """The interval lies wholly above or below ``value``."""
        return self.lo > value or self.hi < value


def ratio_interval(n: float, sx: float, sy: float, sxx: float, syy: float, sxy: float,
                   level: float = LEVEL) -> Interval:
    """The interval of ``R = Σx / Σy`` over ``n`` sequences from the sums of the module doc."""
    m = int(round(n))
    estimate = sx / sy if sy != 0 else math.nan
    if m < 2 or not math.isfinite(estimate):
        return Interval(estimate, math.nan, math.nan, math.nan, m)
    rss = max(sxx - 2 * estimate * sxy + estimate**2 * syy, 0.0)  # rounding may dip below 0
    se = math.sqrt(m / (m - 1) * rss) / abs(sy)
    q = t_quantile(0.5 + level / 2, m - 1)
    return Interval(estimate, estimate - q * se, estimate + q * se, se, m)


def mean_interval(n: float, sx: float, sxx: float, level: float = LEVEL) -> Interval:
    """The interval of the mean of ``n`` per-sequence values from their sum and sum of squares."""
    return ratio_interval(n, sx, n, sxx, n, sx, level)


def sqrt_interval(inner: Interval) -> Interval:
    """The interval of ``sqrt(R)`` from that of ``R`` (monotone: the bounds map; the SE by the delta method)."""
    root = math.sqrt(inner.estimate) if inner.estimate >= 0 else math.nan

    def r(v: float) -> float:
        return math.sqrt(max(v, 0.0)) if math.isfinite(v) else math.nan

    se = inner.se / (2 * root) if root and math.isfinite(root) else math.nan
    return Interval(root, r(inner.lo), r(inner.hi), se, inner.n)
