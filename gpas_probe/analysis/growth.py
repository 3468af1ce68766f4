"""The numbers that describe a model beside a diagnosis: the growth of the residual stream's variance over
depth (the fit ``log var_l = a + b·l``) and the shortcut/branch ratio of the deep quarter.

A fit needs :data:`MIN_LAYERS` layers with a positive variance: through two points a line always fits
exactly (``R² = 1``), which would say nothing about growth. Without a fit the numbers are NaN and
``growth_missing`` says why.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

#: The fewest layers for a growth fit, and for comparing a deep half with a shallow half by correlation.
MIN_LAYERS = 3


def fit_growth(layers: np.ndarray, var: np.ndarray) -> tuple[float, float, float]:
    """Least-squares ``log(var) = a + b·layer`` over positive finite values: ``(b, a, r2)``, NaN below
    :data:`MIN_LAYERS` layers."""
    layers, var = np.asarray(layers, dtype=float), np.asarray(var, dtype=float)
    ok = np.isfinite(var) & (var > 0)
    x, y = layers[ok], np.log(var[ok])
    if len(np.unique(x)) < MIN_LAYERS:
        return math.nan, math.nan, math.nan
    design = np.stack([np.ones_like(x), x], axis=1)
    (a, b), *_ = np.linalg.lstsq(design, y, rcond=None)
    resid = y - (a + b * x)
    total = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float((resid ** 2).sum()) / total if total > 0 else 1.0
    return float(b), float(a), r2


def growth_summary(var: pd.Series, ratio: pd.Series, num_layers: int) -> dict[str, Any]:
    """``growth_rate`` (b), ``growth_factor`` (e^b per layer), ``growth_intercept``, ``growth_r2``,
    ``growth_missing`` (why there is no fit, else None) and ``deep_ratio`` (the mean shortcut/branch ratio
    of the deepest ``ceil(L / 4)`` layers) from per-layer variance and ratio (empty when not recorded)."""
    values = var.to_numpy(dtype=float)
    b, a, r2 = fit_growth(var.index.to_numpy(), values)
    usable = int((np.isfinite(values) & (values > 0)).sum())
    missing = None
    if var.empty:
        missing = "no variance recorded to fit a growth rate"
    elif not math.isfinite(b):
        count = f"({usable})" if usable == len(values) else f"with a positive variance ({usable} of {len(values)})"
        missing = f"too few layers {count} to fit a growth rate"
    first_deep_quarter = num_layers - math.ceil(num_layers / 4)
    deep_ratio = float(ratio[ratio.index >= first_deep_quarter].mean()) if not ratio.empty else math.nan
    return {"growth_rate": b, "growth_factor": math.exp(b) if math.isfinite(b) else math.nan,
            "growth_intercept": a, "growth_r2": r2, "growth_missing": missing, "deep_ratio": deep_ratio}
