"""A verdict on deep-layer underuse, with the evidence per layer (``gpas-probe diagnose``).

The paper's framing (DESIGN §8): in a Pre-LN Transformer the residual stream's variance grows with
depth, so in deep layers the shortcut drowns the sub-layer's output; those layers then move the
stream little (a near-identity map), deleting them costs little loss, and their parameters receive
comparatively small gradients. Each symptom is one *signal*, read from the long probe table at one
step per signal (``step=`` if given, else the last step at which that signal was recorded):

============ ======================================================= ==============================
signal       per-layer evidence (columns of :attr:`Diagnosis.layers`) fires when
============ ======================================================= ==============================
variance     ``var``: ``var`` of ``resid_post`` (fwd); ``var_rel``:   ``var_rel > max_var_rel``
             ``var`` divided by layer 0's
ratio        ``ratio``: shortcut/branch RMS ratio (fwd), mean of the  ``ratio > max_ratio``
             ``attn`` and ``mlp`` sub-layers
grad         ``grad_norm``: parameter gradient norm (site ``params``) ``grad_rel < min_grad_rel``
             ``grad_rel``: divided by the median of the shallow half
deletion     ``deletion_delta``: loss increase when the layer is      ``delta < min_deletion`` or
             deleted (site ``importance``, profiles only)             ``delta < min_deletion_rel ×
                                                                      median over layers``
angular      ``angular``: ``arccos(cos(h_l, h_{l+1}))/π`` (site       ``angular < min_angular`` or
             ``angular_n1``, profiles only); without it, the angle    ``angular < min_angular_rel ×
             equivalent ``arccos(1 - block_influence)/π``            median over layers``
============ ======================================================= ==============================

A training run has variance, ratio and gradient rows but no importance; a ``gpas-probe profile``
folder has all five. Missing signals are left out of the vote and named in
``summary['signals_missing']``; an absent evidence column holds NaN and its flag is False.

Rule: a layer is *underused* when at least ``needed`` of its available signals fire, where
``needed = min_flags`` if set, else ``min(k, max(2, ceil(k / 2)))`` for ``k`` available signals: at
least half of them, and never a single symptom when two or more were measured (each symptom has
innocent causes on its own: a Pre-LN stream that sums ``l`` healthy branches already has a ratio near
``sqrt(l)``, and the first layers often make a large variance jump). The *verdict* is
``'underuse'`` when at least ``min_fraction`` (default 25%) of the deep half (layers
``L // 2 .. L - 1``) is underused, ``'ok'`` otherwise, and ``'insufficient data'`` when fewer than
two layers or no per-layer signal was recorded.

Model level (in :attr:`Diagnosis.summary`): the variance growth rate ``b`` of the least-squares fit
``log(var_l) = a + b·l`` over layers (``growth_factor = exp(b)`` per layer, ``growth_r2`` its R²),
and ``deep_ratio``, the mean ratio over the deepest quarter.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from gpas_probe.store.schema import check_table
from gpas_probe.table import layer_rows, select

log = logging.getLogger(__name__)

SIGNALS = ("variance", "ratio", "grad", "deletion", "angular")
VERDICTS = ("underuse", "ok", "insufficient data")
EVIDENCE_COLUMNS = ("var", "var_rel", "ratio", "grad_norm", "grad_rel", "deletion_delta", "angular",
                    "block_influence")


@dataclass
class Thresholds:
    """When a signal fires, and how many must fire. Defaults and the reasons for them:

    - ``max_var_rel = 4.0``: the layer's output variance is over 4× that of layer 0 (its RMS twice):
      each later branch is then added to a stream at least twice as large as the first one's.
    - ``max_ratio = 10.0``: the shortcut's RMS is over 10× the branch's, so the branch turns the stream
      by at most ~6° (``atan(1/10)``) even when orthogonal to it. (A Pre-LN stream that merely sums
      ``l`` independent branches of equal size has a ratio near ``sqrt(l)``, under 10 up to ~100
      layers; a ratio beyond that needs the variance growth the paper describes.)
    - ``min_grad_rel = 0.5``: the layer's parameter gradient norm is under half the shallow half's
      median (the paper's 1B Pre-LN layers get 0.05–0.1, up to 0.5 with GPAS; DESIGN §8.5).
    - ``min_deletion = 0.01`` nats, ``min_deletion_rel = 0.25``: deleting the layer costs under 0.01
      nats/token, or under a quarter of the median layer's cost.
    - ``min_angular = 0.05``, ``min_angular_rel = 0.5``: the layer turns its input by under 9°
      (``cos > 0.988``, a near-identity map), or by under half of the median layer's angle.
    - ``min_flags = None``: the at-least-half rule of the module doc; an integer fixes the count.
    - ``min_fraction = 0.25``: the verdict is ``'underuse'`` when a quarter of the deep half is
      underused (the paper's claim is about the deepest layers, not all of them).
    """

    max_var_rel: float = 4.0
    max_ratio: float = 10.0
    min_grad_rel: float = 0.5
    min_deletion: float = 0.01
    min_deletion_rel: float = 0.25
    min_angular: float = 0.05
    min_angular_rel: float = 0.5
    min_flags: int | None = None
    min_fraction: float = 0.25

    def __post_init__(self) -> None:
        for name in ("max_var_rel", "max_ratio"):
            if not getattr(self, name) > 0:
                raise ValueError(f"threshold {name} must be positive, got {getattr(self, name)}")
        for name in ("min_grad_rel", "min_deletion_rel", "min_angular_rel", "min_angular"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"threshold {name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.min_fraction <= 1.0:
            raise ValueError(f"threshold min_fraction must be in [0, 1], got {self.min_fraction}")
        if self.min_flags is not None and self.min_flags < 1:
            raise ValueError(f"threshold min_flags must be >= 1, got {self.min_flags}")
        if math.isnan(self.min_deletion):
            raise ValueError("threshold min_deletion must be a number, got nan")

    def needed(self, available: int) -> int:
        """How many of ``available`` signals must fire for a layer to count as underused."""
        if self.min_flags is not None:
            return self.min_flags
        return min(available, max(2, math.ceil(available / 2)))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Diagnosis:
    """One run's verdict (``'underuse'``, ``'ok'`` or ``'insufficient data'``) and its evidence.

    ``layers``: one row per layer with the evidence columns (NaN where not recorded), a boolean
    ``flag_<signal>`` per signal, ``signals`` (available at this layer), ``flags`` (fired),
    ``underused``. ``summary``: model-level numbers, the signals used and missing, the step each
    signal was read at, and the thresholds (see the module doc).
    """

    run_id: str
    verdict: str
    layers: pd.DataFrame
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def underused(self) -> bool:
        return self.verdict == "underuse"

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: plain ints, floats, bools and strings; NaN and infinities become ``None``."""
        layers = [{k: _json_value(v) for k, v in row.items()} for row in self.layers.to_dict(orient="records")]
        return {"run_id": self.run_id, "verdict": self.verdict, "summary": _json_value(self.summary),
                "layers": layers}


def _json_value(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _json_value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_value(x) for x in v]
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return float(v) if math.isfinite(v) else None
    if v is None or v is pd.NA:
        return None
    return str(v) if not isinstance(v, str) else v


# ------------------------------------------------------------------------------------------ evidence


def _profile(data: pd.DataFrame, sites: list[str], stat: str, direction: str | None,
             step: int | None) -> tuple[pd.Series, int | None, str | None]:
    """Mean value per layer at ``step`` (default the last step with rows), the step, and why it is empty."""
    rows = layer_rows(select(data, stat=stat, site=sites, direction=direction))
    what = f"no {stat!r} rows at {'/'.join(sites)}"
    if rows.empty:
        return pd.Series(dtype=float), None, what
    chosen = int(rows["step"].max()) if step is None else int(step)
    rows = rows[rows["step"].to_numpy() == chosen]
    if rows.empty:
        return pd.Series(dtype=float), None, f"{what} at step {chosen}"
    by_layer = rows.groupby(rows["layer"].astype(int))["value"].mean()
    return by_layer.astype(float), chosen, None


def fit_growth(layers: np.ndarray, var: np.ndarray) -> tuple[float, float, float]:
    """Least-squares ``log(var) = a + b·layer`` over positive finite values: ``(b, a, r2)``, NaN below 2 points."""
    layers, var = np.asarray(layers, dtype=float), np.asarray(var, dtype=float)
    ok = np.isfinite(var) & (var > 0)
    x, y = layers[ok], np.log(var[ok])
    if len(np.unique(x)) < 2:
        return math.nan, math.nan, math.nan
    design = np.stack([np.ones_like(x), x], axis=1)
    (a, b), *_ = np.linalg.lstsq(design, y, rcond=None)
    resid = y - (a + b * x)
    total = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float((resid ** 2).sum()) / total if total > 0 else 1.0
    return float(b), float(a), r2


def _below(values: pd.Series, absolute: float, relative: float) -> pd.Series:
    """``values < absolute`` or ``values < relative × median(values)``; NaN never fires."""
    median = float(values.median()) if values.notna().any() else math.nan
    fire = values < absolute
    if math.isfinite(median):
        fire |= values < relative * median
    return fire & values.notna()


def diagnose(data: pd.DataFrame, thresholds: Thresholds | None = None, step: int | None = None, *,
             run: str | None = None) -> Diagnosis:
    """The underuse verdict of one run of the long probe table (see the module doc for the rule).

    ``run`` picks a run when ``data`` holds several (or use :func:`diagnose_runs`). ``step`` reads
    every signal at that step; by default each signal at the last step it was recorded."""
    check_table(data)
    th = thresholds or Thresholds()
    present = [str(r) for r in pd.unique(data["run_id"])]
    if run is None:
        if len(present) != 1:
            raise ValueError(f"data holds {len(present)} runs {present}; pass run= or use diagnose_runs()")
        run = present[0]
    elif str(run) not in present:
        raise ValueError(f"run {run!r} is not in the data; runs present: {present}")
    data = data[np.asarray(data["run_id"].astype(str) == str(run), dtype=bool)]

    sources = {
        "variance": (["resid_post"], "var", "fwd"),
        "ratio": (["attn", "mlp"], "shortcut_branch_ratio", "fwd"),
        "grad": (["params"], "grad_norm", None),
        "deletion": (["importance"], "deletion_delta", None),
        "angular": (["angular_n1"], "angular_distance", None),
    }
    profiles: dict[str, pd.Series] = {}
    steps: dict[str, int] = {}
    missing: dict[str, str] = {}
    for name, (sites, stat, direction) in sources.items():
        profiles[name], at, why = _profile(data, sites, stat, direction, step)
        if why is None:
            steps[name] = int(at)  # type: ignore[arg-type]
        else:
            missing[name] = why
    influence, influence_step, _ = _profile(data, ["importance"], "block_influence", None, step)
    angular_source = "angular_n1"
    if "angular" in missing and not influence.empty:
        angular_source = "block_influence"
        profiles["angular"] = np.arccos((1.0 - influence).clip(-1.0, 1.0)) / math.pi
        steps["angular"] = int(influence_step)  # type: ignore[arg-type]
        del missing["angular"]

    all_layers = sorted(set().union(*(p.index for p in profiles.values()), influence.index))
    table = pd.DataFrame({"layer": np.asarray(all_layers, dtype=int)})
    idx = pd.Index(all_layers)

    def col(series: pd.Series) -> np.ndarray:
        return series.reindex(idx).to_numpy(dtype=float) if not series.empty else np.full(len(idx), np.nan)

    num_layers = (max(all_layers) + 1) if all_layers else 0
    shallow = [layer for layer in all_layers if layer < num_layers // 2]
    table["var"] = col(profiles["variance"])
    base = profiles["variance"].get(0, math.nan)
    table["var_rel"] = table["var"] / base if base and math.isfinite(base) and base > 0 else math.nan
    table["ratio"] = col(profiles["ratio"])
    table["grad_norm"] = col(profiles["grad"])
    shallow_grad = profiles["grad"].reindex(shallow).median() if shallow else math.nan
    table["grad_rel"] = table["grad_norm"] / shallow_grad if shallow_grad and shallow_grad > 0 else math.nan
    table["deletion_delta"] = col(profiles["deletion"])
    table["angular"] = col(profiles["angular"])
    table["block_influence"] = col(influence)
    if "variance" not in missing and table["var_rel"].isna().all():
        missing["variance"] = "no positive 'var' at layer 0 to compare with"
    if "grad" not in missing and table["grad_rel"].isna().all():
        missing["grad"] = "no positive 'grad_norm' in the shallow half to compare with"

    fire = {
        "variance": table["var_rel"] > th.max_var_rel,
        "ratio": table["ratio"] > th.max_ratio,
        "grad": table["grad_rel"] < th.min_grad_rel,
        "deletion": _below(table["deletion_delta"], th.min_deletion, th.min_deletion_rel),
        "angular": _below(table["angular"], th.min_angular, th.min_angular_rel),
    }
    measured = {"variance": "var_rel", "ratio": "ratio", "grad": "grad_rel", "deletion": "deletion_delta",
                "angular": "angular"}
    used = [s for s in SIGNALS if s not in missing]
    available = np.zeros(len(table), dtype=int)
    for s in SIGNALS:
        has = table[measured[s]].notna().to_numpy() & (s in used)
        table[f"flag_{s}"] = fire[s].fillna(False).to_numpy(dtype=bool) & has
        available += has
    table["signals"] = available
    table["flags"] = table[[f"flag_{s}" for s in SIGNALS]].sum(axis=1).astype(int)
    needed = np.array([th.needed(k) for k in available], dtype=int)
    table["underused"] = (available > 0) & (table["flags"].to_numpy() >= needed)

    deep = table[table["layer"] >= num_layers // 2]
    n_under = int(deep["underused"].sum())
    fraction = n_under / len(deep) if len(deep) else math.nan
    if num_layers < 2 or not used:
        verdict = "insufficient data"
    elif n_under > 0 and fraction >= th.min_fraction:
        verdict = "underuse"
    else:
        verdict = "ok"

    var = profiles["variance"]
    b, a, r2 = fit_growth(var.index.to_numpy(), var.to_numpy()) if not var.empty else (math.nan,) * 3
    first_deep_quarter = num_layers - math.ceil(num_layers / 4)
    ratio = profiles["ratio"]
    deep_ratio = float(ratio[ratio.index >= first_deep_quarter].mean()) if not ratio.empty else math.nan
    summary = {
        "num_layers": num_layers,
        "deep_layers": [int(x) for x in deep["layer"]],
        "underused_layers": [int(x) for x in table.loc[table["underused"], "layer"]],
        "fraction_underused": fraction,
        "growth_rate": b,
        "growth_factor": math.exp(b) if math.isfinite(b) else math.nan,
        "growth_intercept": a,
        "growth_r2": r2,
        "deep_ratio": deep_ratio,
        "signals_used": used,
        "signals_missing": missing,
        "angular_source": angular_source if "angular" in used else None,
        "flags_needed": th.needed(len(used)) if used else None,
        "steps": steps,
        "thresholds": th.to_dict(),
    }
    if missing:
        log.info("run %s: signals not recorded: %s", run, ", ".join(f"{k} ({v})" for k, v in missing.items()))
    return Diagnosis(run_id=str(run), verdict=verdict, layers=table, summary=summary)


def diagnose_runs(data: pd.DataFrame, thresholds: Thresholds | None = None,
                  step: int | None = None) -> dict[str, Diagnosis]:
    """:func:`diagnose` for each run in ``data``, keyed by run id in order of first appearance."""
    check_table(data)
    return {str(r): diagnose(data, thresholds, step, run=str(r)) for r in pd.unique(data["run_id"])}
