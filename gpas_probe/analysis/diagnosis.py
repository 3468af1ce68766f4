"""A verdict on deep-layer underuse, with the evidence per layer and its confidence (``gpas-probe diagnose``).

The paper's framing (DESIGN §8): in a Pre-LN Transformer the residual stream's variance grows with
depth, so in deep layers the shortcut drowns the sub-layer's output; such a layer moves the stream little
and deleting it costs little loss. The evidence (:mod:`gpas_probe.analysis.evidence`) is read at one
step per signal (``step=`` if given, else the last step each was recorded); a ``step=`` without per-layer
rows is a ValueError naming the steps that have them.

**Causal evidence decides.** A profile measures the loss increase when each layer is deleted
(``deletion``) and the angle each layer turns the stream by (``angular``), each with its 95% interval.
A layer's value is *low* when its whole interval lies below the threshold ``τ = max(absolute,
relative × median over layers)``, *high* when it lies at or above, *unclear* otherwise. The layer is:

- ``used`` when its deletion cost is high, and always when it lies clearly (its lower bound) above the
  median layer's, in the top half of the model;
- ``underused`` when its deletion cost is low;
- ``inconclusive`` when the interval straddles the threshold.

Deletion decides where it was measured (exactly, or else by its first-order estimate from a profile's
backward pass, ``--importance estimate``: ``summary["estimate_agreement"]`` gives the Spearman rank
correlation of the two where a profile recorded both); the angular distance where it alone was (for instance when
only block influence, ``1 - cos``, was recorded: its angle equivalent is used). Without intervals (older
profiles) the values count as exact.

**Correlational evidence explains**, and decides only when nothing causal was measured (a training
run), then by vote and said so: ``variance`` (the layer's output variance over layer 0's, above
``max_var_rel``), ``ratio`` (shortcut/branch RMS, above ``max_ratio``) and ``grad`` (parameter
gradient norm over the shallow half's median, below ``min_grad_rel``) fire, each read without outlier
tokens where recorded; a layer is underused when ``min_flags`` of them fire (default: at least half of
the available signals and at least 2 (all of them when fewer than 2 are available)).

**Verdict.** Of the deep half (layers ``L // 2 .. L - 1``) at least ``need = ceil(min_fraction × deep)``
layers must be underused for ``'underuse'``; if even counting every inconclusive deep layer as underused
stays below ``need`` it is ``'ok'``; otherwise ``'inconclusive'``, with how many evaluation tokens would
settle it (the intervals narrow as ``1 / sqrt(tokens)``). ``'insufficient data'`` without per-layer
evidence (``summary["reason"]`` says why). Findings (sink tokens and massive activations,
:mod:`gpas_probe.analysis.findings`) are reported beside the verdict; the variance growth fit
``log var_l = a + b·l`` (over at least 3 layers; else no fit and ``summary["growth_missing"]`` says why)
and the deep-quarter ratio describe the model (:mod:`gpas_probe.analysis.growth`).

**Models under 3 layers.** Underuse of the deep half is judged against the shallow half. With one layer
there is no shallow half: ``'insufficient data'`` ("1 layer: too few to compare shallow and deep
layers"). With two, the deep half is layer 1 and the shallow half layer 0 alone: variance relative to
layer 0 and gradient relative to the shallow half compare one layer with its one neighbour (and layer 0
is often unlike the rest), with no depth to grow over, so both count as missing ("2 layers: too few to
compare shallow and deep layers") and no correlational vote decides: a training run of 2 layers is
``'insufficient data'`` for that reason. Causal evidence still decides a 2-layer model: layer 1's
deletion cost (or angle) is a measurement, held against the absolute floor (and the two layers' median),
not a comparison with a reference layer. A signal is in ``signals_used`` or in ``signals_missing`` (with
why), never both.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from gpas_probe.analysis.evidence import (
    INFLUENCE,
    SIGNALS,
    Evidence,
    check_step,
    estimate_agreement,
    model_value,
    read,
    read_angular,
)
from gpas_probe.analysis.findings import massive_activations
from gpas_probe.analysis.growth import MIN_LAYERS, growth_summary
from gpas_probe.store.schema import check_table

log = logging.getLogger(__name__)

SIGNAL_NAMES = tuple(s.name for s in SIGNALS)
VERDICTS = ("underuse", "ok", "inconclusive", "insufficient data")
STATUSES = ("underused", "used", "inconclusive", "no evidence")
#: The correlational vote's default count, in words (the rule of :meth:`Thresholds.needed`).
VOTE_RULE = "at least half of the available signals and at least 2 (all of them when fewer than 2 are available)"


@dataclass
class Thresholds:
    """When a signal counts as low or fires, and how much of the deep half decides. Defaults:

    - ``min_deletion = 0.01`` nats, ``min_deletion_rel = 0.25``: deleting the layer costs under 0.01
      nats/token, or under a quarter of the median layer's cost;
    - ``min_angular = 0.05``, ``min_angular_rel = 0.5``: the layer turns its input by under 9°
      (``cos > 0.988``), or by under half of the median layer's angle;
    - ``max_var_rel = 4.0``: the layer's output variance is over 4× layer 0's;
    - ``max_ratio = 10.0``: the shortcut's RMS is over 10× the branch's (a branch then turns the stream
      by at most ~6°; a stream that merely sums ``l`` equal branches has a ratio near ``sqrt(l)``);
    - ``min_grad_rel = 0.5``: the layer's gradient norm is under half the shallow half's median;
    - ``min_flags = None``: how many correlational signals must fire (default: at least half of the available
      signals and at least 2 (all of them when fewer than 2 are available));
    - ``min_fraction = 0.25``: the share of the deep half that must be underused.
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
        """How many of ``available`` correlational signals must fire for a layer to count as underused:
        ``min_flags`` if set, else at least half of the available signals and at least 2 (all of them when
        fewer than 2 are available), ``min(available, max(2, ceil(available / 2)))``."""
        if self.min_flags is not None:
            return self.min_flags
        return min(available, max(2, math.ceil(available / 2)))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Diagnosis:
    """One run's verdict (:data:`VERDICTS`) and its evidence.

    ``layers``: one row per layer: the causal evidence with its bounds (``deletion_delta``,
    ``deletion_lo``, ``deletion_hi``, ``angular`` ...), the correlational evidence and its ``flag_*``,
    ``status`` (:data:`STATUSES`) and what decided it (``decided_by``). ``summary``: what decided the
    verdict (or, for ``'insufficient data'``, why not: ``reason``), the confidence, the advice when
    inconclusive, the findings, the signals used and missing (never both), the steps and statistics read
    (of the signals used), the thresholds and the model-level numbers (see the module doc)."""

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


# ------------------------------------------------------------------------------------------ the rule


def causal_level(ev: Evidence, absolute: float, relative: float, index: pd.Index) -> tuple[pd.Series, float]:
    """Per layer ``'low'``, ``'high'``, ``'unclear'`` or ``''`` (not measured) against the threshold of the
    module doc, which is returned with it; without bounds a value counts as exact."""
    value = ev.value.reindex(index)
    lo, hi = ev.lo.reindex(index).fillna(value), ev.hi.reindex(index).fillna(value)
    median = float(value.median()) if value.notna().any() else math.nan
    tau = max(absolute, relative * median) if math.isfinite(median) else absolute
    level = pd.Series("", index=index, dtype=object)
    level[value.notna()] = "unclear"
    level[hi < tau] = "low"
    level[(lo >= tau) | (lo > median)] = "high"  # clearly in the top half: never underused
    return level, tau


def _vote(table: pd.DataFrame, th: Thresholds, used: list[str]) -> pd.Series:
    """The correlational vote per layer (module doc): True = underused."""
    fires = {"variance": table["var_rel"] > th.max_var_rel, "ratio": table["ratio"] > th.max_ratio,
             "grad": table["grad_rel"] < th.min_grad_rel}
    columns = {"variance": "var_rel", "ratio": "ratio", "grad": "grad_rel"}
    available = np.zeros(len(table), dtype=int)
    for name, fire in fires.items():
        has = table[columns[name]].notna().to_numpy() & (name in used)
        table[f"flag_{name}"] = fire.fillna(False).to_numpy(dtype=bool) & has
        available += has
    table["signals"] = available
    table["flags"] = table[[f"flag_{s}" for s in fires]].sum(axis=1).astype(int)
    needed = np.array([th.needed(k) for k in available], dtype=int)
    return pd.Series((available > 0) & (table["flags"].to_numpy() >= needed), index=table.index)


def _advice(table: pd.DataFrame, deep: pd.Series, tokens: float) -> tuple[str | None, int | None]:
    """How many evaluation tokens would settle the inconclusive deep layers (half-widths shrink as
    ``1 / sqrt(tokens)``), or None without a token count."""
    rows = table[deep & (table["status"] == "inconclusive")]
    factors = []
    for row in rows.itertuples(index=False):
        value, lo, hi, tau = row.decided_value, row.decided_lo, row.decided_hi, row.decided_tau
        gap, half = abs(value - tau), (hi - lo) / 2
        # aim for a half-width of half the gap to the threshold
        factors.append(4 * (half / gap) ** 2 if gap > 0 and math.isfinite(half) else math.inf)
    if not factors or not math.isfinite(tokens) or tokens <= 0:
        return None, None
    factor = max(factors)
    if not math.isfinite(factor) or factor > 256:
        return (f"layers {[int(v) for v in rows['layer']]} sit on the threshold: more evaluation data narrows their "
                "intervals but may not settle them"), None
    needed = int(2 ** math.ceil(math.log2(max(tokens * factor, tokens * 2))))
    return f"use at least {needed:,} evaluation tokens (now {int(tokens):,}) to settle layers " \
           f"{[int(v) for v in rows['layer']]}", needed


def diagnose(data: pd.DataFrame, thresholds: Thresholds | None = None, step: int | None = None, *,
             run: str | None = None) -> Diagnosis:
    """The underuse verdict of one run of the long probe table (see the module doc for the rule).

    ``run`` picks a run when ``data`` holds several (or use :func:`diagnose_runs`). ``step`` reads
    every signal at that step (a ValueError naming the recorded steps when it has no per-layer rows); by
    default each signal at the last step it was recorded."""
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
    if step is not None:
        check_step(data, step, str(run))

    ev = {s.name: read(data, s, step) for s in SIGNALS if s.name != "angular"}
    ev["angular"] = read_angular(data, step)
    missing = {name: e.missing for name, e in ev.items() if not e.available}
    layers = sorted(set().union(*(e.value.index for e in ev.values())))
    idx = pd.Index(layers)
    table = pd.DataFrame({"layer": np.asarray(layers, dtype=int)})
    num_layers = (max(layers) + 1) if layers else 0
    too_few = f"{num_layers} layer{'' if num_layers == 1 else 's'}: too few to compare shallow and deep layers"

    def col(series: pd.Series) -> np.ndarray:
        return series.reindex(idx).to_numpy(dtype=float) if not series.empty else np.full(len(idx), np.nan)

    for name, prefix in (("deletion", "deletion"), ("angular", "angular")):
        table[f"{prefix}_delta" if name == "deletion" else prefix] = col(ev[name].value)
        table[f"{prefix}_lo"], table[f"{prefix}_hi"] = col(ev[name].lo), col(ev[name].hi)
    table["block_influence"] = col(read(data, INFLUENCE, step).value)
    table["var"] = col(ev["variance"].value)
    base = ev["variance"].value.get(0, math.nan)
    table["var_rel"] = table["var"] / base if base and math.isfinite(base) and base > 0 else math.nan
    table["ratio"] = col(ev["ratio"].value)
    table["grad_norm"] = col(ev["grad"].value)
    shallow = [layer for layer in layers if layer < num_layers // 2]
    shallow_grad = ev["grad"].value.reindex(shallow).median() if shallow else math.nan
    table["grad_rel"] = table["grad_norm"] / shallow_grad if shallow_grad and shallow_grad > 0 else math.nan
    if num_layers < MIN_LAYERS:  # no meaningful reference (module doc)
        for name, column in (("variance", "var_rel"), ("grad", "grad_rel")):
            table[column] = math.nan
            if ev[name].available:
                missing[name] = too_few
    if ev["variance"].available and table["var_rel"].isna().all():
        missing.setdefault("variance", "no positive variance at layer 0 to compare with")
    if ev["grad"].available and table["grad_rel"].isna().all():
        missing.setdefault("grad", "no positive gradient norm in the shallow half to compare with")
    used = [s.name for s in SIGNALS if s.name not in missing]
    voted = _vote(table, th, used)

    causal = next((name for name in ("deletion", "angular") if name in used), None)
    table["status"], table["decided_by"] = "no evidence", ""
    for name in ("deletion", "angular"):
        table[f"{name}_level"] = ""
    taus: dict[str, float] = {}
    for name, absolute, relative in (("deletion", th.min_deletion, th.min_deletion_rel),
                                     ("angular", th.min_angular, th.min_angular_rel)):
        if name in used:
            level, taus[name] = causal_level(ev[name], absolute, relative, idx)
            table[f"{name}_level"] = level.to_numpy()
    if causal is not None:
        value_col = "deletion_delta" if causal == "deletion" else "angular"
        level = table[f"{causal}_level"]
        table.loc[level == "low", "status"] = "underused"
        table.loc[level == "high", "status"] = "used"
        table.loc[level == "unclear", "status"] = "inconclusive"
        table.loc[level != "", "decided_by"] = causal
        table["decided_value"], table["decided_tau"] = table[value_col], taus[causal]
        table["decided_lo"] = table[f"{causal}_lo"].fillna(table[value_col])
        table["decided_hi"] = table[f"{causal}_hi"].fillna(table[value_col])
    elif num_layers >= MIN_LAYERS and any(name in used for name in ("variance", "ratio", "grad")):
        has = table["signals"] > 0
        table.loc[has, "status"] = np.where(voted[has], "underused", "used")
        table.loc[has, "decided_by"] = "correlational"
    table["underused"] = table["status"] == "underused"

    deep = table["layer"] >= num_layers // 2
    n_deep = int(deep.sum())
    n_under = int((deep & table["underused"]).sum())
    n_open = int((deep & (table["status"] == "inconclusive")).sum())
    need = max(1, math.ceil(th.min_fraction * n_deep))
    tokens = model_value(data, "tokens", ev["deletion"].step if causal == "deletion" else step)
    sequences = model_value(data, "sequences", ev["deletion"].step if causal == "deletion" else step)
    advice, advised_tokens, reason = None, None, None
    if not used:
        reason = "no per-layer signal recorded"
    elif num_layers < 2 or (num_layers < MIN_LAYERS and causal is None):
        reason = too_few
    elif (table["status"] == "no evidence").all():
        reason = "no layer has evidence"
    if reason is not None:
        verdict = "insufficient data"
    elif n_under >= need:
        verdict = "underuse"
    elif n_under + n_open < need:
        verdict = "ok"
    else:
        verdict = "inconclusive"
        advice, advised_tokens = _advice(table, deep, tokens)

    decided = causal or ("correlational" if verdict != "insufficient data" else None)
    finding = massive_activations(data, step)
    summary = {
        "num_layers": num_layers,
        "deep_layers": [int(x) for x in table.loc[deep, "layer"]],
        "underused_layers": [int(x) for x in table.loc[table["underused"], "layer"]],
        "inconclusive_layers": [int(x) for x in table.loc[table["status"] == "inconclusive", "layer"]],
        "fraction_underused": n_under / n_deep if n_deep else math.nan,
        "layers_needed": need,
        "reason": reason,
        "decided_by": decided,
        "causal": causal is not None,
        "confidence": {"level": 0.95, "intervals": bool(causal and ev[causal].has_intervals),
                       "sequences": sequences, "tokens": tokens},
        "advice": advice,
        "advised_tokens": advised_tokens,
        "thresholds_used": taus,
        "findings": {"massive_activations": finding} if finding else {},
        "estimate_agreement": estimate_agreement(data, step),
        **growth_summary(ev["variance"].value, ev["ratio"].value, num_layers),
        "signals_used": used,
        "signals_missing": missing,
        "statistics_read": {name: ev[name].stat for name in used},
        "angular_source": ev["angular"].stat if "angular" in used else None,
        "flags_needed": th.needed(len([s for s in used if s in ("variance", "ratio", "grad")]) or 1),
        "steps": {name: ev[name].step for name in used},
        "thresholds": th.to_dict(),
    }
    if missing:
        log.info("run %s: signals not used: %s", run, ", ".join(f"{k} ({v})" for k, v in missing.items()))
    return Diagnosis(run_id=str(run), verdict=verdict, layers=table, summary=summary)


def diagnose_runs(data: pd.DataFrame, thresholds: Thresholds | None = None,
                  step: int | None = None) -> dict[str, Diagnosis]:
    """:func:`diagnose` for each run in ``data``, keyed by run id in order of first appearance."""
    check_table(data)
    return {str(r): diagnose(data, thresholds, step, run=str(r)) for r in pd.unique(data["run_id"])}
