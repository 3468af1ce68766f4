"""The per-layer evidence a diagnosis reads from the long probe table, with its 95% intervals.

Causal signals say whether a layer is used: ``deletion`` (the loss increase when the layer is deleted,
measured, or else its first-order estimate ``deletion_estimate`` from a profile's backward pass) and
``angular`` (the angle it turns the residual stream by, ``arccos(cos(h_l, h_{l+1}))/π``; from block
influence ``1 - cos`` when only that was recorded). Correlational signals say why: ``variance`` (of
the layer's output), ``ratio`` (shortcut/branch) and ``grad`` (parameter gradient norm). Each reads
the first of its statistics present: the robust ones (without outlier tokens, see
:mod:`gpas_probe.probes.outliers`) before the raw ones, so that a sink token cannot dominate them.
Intervals come from the ``_lo``/``_hi`` rows a profile writes; without them a value is a point estimate.
A step asked for must have per-layer rows (:func:`check_step`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from gpas_probe.store.schema import IMPORTANCE_SITE, MODEL_LAYER, MODEL_SITE
from gpas_probe.table import layer_rows, select

CAUSAL, CORRELATIONAL = "causal", "correlational"
#: Up to this many steps are listed one by one in messages; more are given as ``first..last (n steps)``.
FEW_STEPS = 8


@dataclass(frozen=True)
class Signal:
    """Where a signal's rows are: the sites averaged per layer, the statistics tried in order."""

    name: str
    kind: str
    sites: tuple[str, ...]
    stats: tuple[str, ...]
    direction: str | None = None


SIGNALS = (
    Signal("deletion", CAUSAL, (IMPORTANCE_SITE,), ("deletion_delta", "deletion_estimate")),
    Signal("angular", CAUSAL, ("angular_n1",), ("angular_distance",)),
    Signal("variance", CORRELATIONAL, ("resid_post",), ("var_robust", "var"), "fwd"),
    Signal("ratio", CORRELATIONAL, ("attn", "mlp"), ("shortcut_branch_ratio_robust", "shortcut_branch_ratio"), "fwd"),
    Signal("grad", CORRELATIONAL, ("params",), ("grad_norm",)),
)
BY_NAME = {s.name: s for s in SIGNALS}
INFLUENCE = Signal("angular", CAUSAL, (IMPORTANCE_SITE,), ("block_influence",))


@dataclass
class Evidence:
    """One signal per layer: its value and 95% bounds (NaN where not recorded), the statistic and step
    read, or why there is none (``missing``)."""

    signal: Signal
    value: pd.Series
    lo: pd.Series
    hi: pd.Series
    stat: str | None = None
    step: int | None = None
    missing: str | None = None

    @property
    def available(self) -> bool:
        return self.missing is None

    @property
    def has_intervals(self) -> bool:
        return self.available and bool(self.lo.notna().any())


def _per_layer(rows: pd.DataFrame, stat: str, step: int) -> pd.Series:
    rows = rows[(rows["stat"].astype(str) == stat).to_numpy() & (rows["step"].to_numpy() == step)]
    return rows.groupby(rows["layer"].astype(int))["value"].mean().astype(float)


def read(data: pd.DataFrame, signal: Signal, step: int | None = None) -> Evidence:
    """The evidence of ``signal`` in one run's table at ``step`` (default: the last step it was recorded)."""
    empty = pd.Series(dtype=float)
    for stat in signal.stats:
        rows = layer_rows(select(data, stat=[stat, f"{stat}_lo", f"{stat}_hi"], site=list(signal.sites),
                                 direction=signal.direction))
        if rows.empty:
            continue
        chosen = int(rows["step"].max()) if step is None else int(step)
        value = _per_layer(rows, stat, chosen)
        if value.empty:
            return Evidence(signal, empty, empty, empty, missing=f"no {stat!r} rows at step {chosen}")
        lo = _per_layer(rows, f"{stat}_lo", chosen).reindex(value.index)
        hi = _per_layer(rows, f"{stat}_hi", chosen).reindex(value.index)
        return Evidence(signal, value, lo, hi, stat, chosen)
    stats = " or ".join(repr(s) for s in signal.stats)
    return Evidence(signal, empty, empty, empty, missing=f"no {stats} rows at {'/'.join(signal.sites)}")


def read_angular(data: pd.DataFrame, step: int | None = None) -> Evidence:
    """The angular signal, or its equivalent ``arccos(1 - block_influence)/π`` when only block influence was
    recorded (the bounds map the same way: the angle grows with the influence)."""
    angular = read(data, BY_NAME["angular"], step)
    if angular.available:
        return angular
    influence = read(data, INFLUENCE, step)
    if not influence.available:
        return angular

    def angle(s: pd.Series) -> pd.Series:
        return pd.Series(np.arccos((1.0 - s.to_numpy(dtype=float)).clip(-1.0, 1.0)) / math.pi, index=s.index)

    return Evidence(angular.signal, angle(influence.value), angle(influence.lo), angle(influence.hi),
                    "block_influence", influence.step)


def estimate_agreement(data: pd.DataFrame, step: int | None = None) -> dict[str, float] | None:
    """How well the first-order deletion estimate ranks the layers against exact deletion at the same step:
    ``{"spearman": rho, "layers": n, "step": step}``, or None unless both were recorded (at least 3 layers)."""
    exact = read(data, Signal("deletion", CAUSAL, (IMPORTANCE_SITE,), ("deletion_delta",)), step)
    if not exact.available:
        return None
    estimate = read(data, Signal("deletion", CAUSAL, (IMPORTANCE_SITE,), ("deletion_estimate",)), exact.step)
    if not estimate.available:
        return None
    both = pd.concat([exact.value, estimate.value], axis=1, join="inner").dropna()
    if len(both) < 3:
        return None
    ranks = both.rank()
    rho = float(np.corrcoef(ranks.iloc[:, 0], ranks.iloc[:, 1])[0, 1])
    return {"spearman": rho, "layers": len(both), "step": exact.step}


def model_value(data: pd.DataFrame, stat: str, step: int | None) -> float:
    """A model-level value (layer -1) at ``step`` (default: the last step it was recorded), or NaN."""
    rows = select(data, stat=stat, site=MODEL_SITE)
    rows = rows[rows["layer"].to_numpy() == MODEL_LAYER]
    if rows.empty:
        return math.nan
    chosen = int(rows["step"].max()) if step is None else int(step)
    at = rows[rows["step"].to_numpy() == chosen]
    return float(at["value"].mean()) if len(at) else math.nan


def steps_text(steps: Iterable[int]) -> str:
    """Steps for a message: ``'10, 20, 30'`` when there are at most :data:`FEW_STEPS`, else
    ``'1..300 (21 steps)'``; ``'none'`` when there are none."""
    steps = sorted({int(s) for s in steps})
    if not steps:
        return "none"
    if len(steps) <= FEW_STEPS:
        return ", ".join(str(s) for s in steps)
    return f"{steps[0]}..{steps[-1]} ({len(steps)} steps)"


def check_step(data: pd.DataFrame, step: int, run: str) -> None:
    """Raise a one-line ValueError unless one run's table has per-layer rows at ``step``, naming the steps
    that have them (and calling them the recorded steps when no other step was recorded)."""
    layered = {int(s) for s in pd.unique(layer_rows(data)["step"])}
    if int(step) in layered:
        return
    recorded = {int(s) for s in pd.unique(data["step"])}
    listed = "recorded steps" if recorded == layered else "steps with per-layer rows"
    if int(step) not in recorded:
        raise ValueError(f"step {step} was not recorded in {run}; {listed}: {steps_text(layered)}")
    raise ValueError(f"step {step} of {run} has only model-level rows; {listed}: {steps_text(layered)}")
