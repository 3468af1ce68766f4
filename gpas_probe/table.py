"""Selecting and aggregating the long probe table, shared by the plots and the analyses.

Every helper reduces before anything is drawn or compared: rows are filtered one column at a time (each
filter scans only what the previous one kept) and duplicates of one key are averaged with a groupby.
String columns may be plain strings or pandas categoricals.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from gpas_probe.intervals import LEVEL, t_quantile
from gpas_probe.store.schema import GATE_SITES, KEY_COLUMNS, as_table_frame

#: The statistics recorded for each GPAS gate.
GATE_STATS = ("alpha", "silu_alpha", "scale", "alpha_grad")
_STRING_KEYS = ("run_id", "site", "direction", "stat")


def select(data: pd.DataFrame, **equal: Any) -> pd.DataFrame:
    """Rows where each named column equals the value (or is in the list/tuple/set); ``None`` skips a column.

    Filters apply in keyword order, each on the rows the previous one kept: put the most selective first.
    """
    out = data
    for column, want in equal.items():
        if want is None:
            continue
        col = out[column]
        mask = col.isin(list(want)) if isinstance(want, (list, tuple, set, frozenset)) else col == want
        out = out[np.asarray(mask, dtype=bool)]
    return out


def layer_rows(data: pd.DataFrame) -> pd.DataFrame:
    """Only per-layer rows (``layer >= 0``; model-level rows have layer -1)."""
    return data[data["layer"].to_numpy() >= 0]


def mean_by(data: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """Mean ``value`` per key combination (duplicates averaged), sorted, with string keys as ``str``."""
    if data.empty:
        return pd.DataFrame({**{k: pd.Series(dtype=object) for k in keys}, "value": pd.Series(dtype=float)})
    out = data.groupby(list(keys), observed=True, sort=True)["value"].mean().reset_index()
    for k in keys:
        if k in _STRING_KEYS:
            out[k] = out[k].astype(str)
    return out


def last_step(rows: pd.DataFrame, by: str = "run_id") -> pd.DataFrame:
    """The rows of each ``by`` group (default: each run) at that group's largest ``step``."""
    if rows.empty:
        return rows
    last = rows.groupby(by, observed=True)["step"].transform("max")
    return rows[rows["step"].to_numpy() == last.to_numpy()]


def run_ids(data: pd.DataFrame) -> list[str]:
    """Run ids in order of first appearance."""
    return [str(r) for r in pd.unique(data["run_id"])]


def run_list(data: pd.DataFrame, runs: Iterable[str] | str | None) -> list[str]:
    """``runs`` as a list of strings (not checked: a run absent from ``data`` simply has no rows), or every run."""
    if runs is None:
        return run_ids(data)
    return [str(r) for r in ([runs] if isinstance(runs, str) else runs)]


def resolve_runs(data: pd.DataFrame, runs: Iterable[str] | str | None) -> list[str]:
    """``runs`` as a list (checked against the table), or every run in the table."""
    present = run_ids(data)
    if runs is None:
        return present
    runs = run_list(data, runs)
    unknown = [r for r in runs if r not in present]
    if unknown:
        raise ValueError(f"runs {unknown} are not in the data; runs present: {present}")
    if not runs:
        raise ValueError("runs is empty")
    return runs


def scale_from_alpha(alpha: np.ndarray | pd.Series) -> np.ndarray:
    """The GPAS forward scale ``1 - SiLU(alpha) = 1 - alpha * sigmoid(alpha)``."""
    a = np.asarray(alpha, dtype=float)
    return 1.0 - a / (1.0 + np.exp(-a))


def gate_values(data: pd.DataFrame, stat: str = "scale") -> pd.DataFrame:
    """Mean gate ``stat`` per (run_id, site, layer, step), columns in that order plus ``value``; ``scale``
    is derived from ``alpha`` (:func:`scale_from_alpha`) for the runs and sites that recorded only alpha."""
    if stat not in GATE_STATS:
        raise ValueError(f"stat must be one of {list(GATE_STATS)}, got {stat!r}")
    wanted = [stat, "alpha"] if stat == "scale" else [stat]
    table = mean_by(layer_rows(select(data, site=list(GATE_SITES), stat=wanted)),
                    ["run_id", "site", "layer", "step", "stat"])
    direct = table[table["stat"] == stat]
    if stat == "scale":
        alpha = table[table["stat"] == "alpha"]
        have = pd.MultiIndex.from_frame(direct[["run_id", "site"]])
        alpha = alpha[~pd.MultiIndex.from_frame(alpha[["run_id", "site"]]).isin(have)].copy()
        if not alpha.empty:
            alpha["value"] = scale_from_alpha(alpha["value"])
            direct = pd.concat([direct, alpha], ignore_index=True)
    return direct.drop(columns="stat").sort_values(["run_id", "site", "layer", "step"], ignore_index=True)


def aggregate_runs(data: pd.DataFrame, groups: Mapping[str, str]) -> pd.DataFrame:
    """The long table with each group of runs (``run_id -> group``, e.g. the seeds of one configuration)
    as one run named after the group: every statistic is the mean over the group's runs at that step, with
    ``{stat}_lo``/``{stat}_hi`` rows for the 95% interval of that mean across runs (Student's t; none for a
    statistic only one run recorded). Runs not in ``groups`` stay as they are; intervals the runs carried
    themselves are dropped (they describe one run's evaluation data, not the spread across runs)."""
    stats = data["stat"].astype(str)
    rows = data[~(stats.str.endswith("_lo") | stats.str.endswith("_hi")).to_numpy()]
    group = rows["run_id"].astype(str).map(lambda r: groups.get(r, r))
    by = rows.assign(run_id=group).groupby(["run_id", *KEY_COLUMNS], observed=True, sort=False)["value"]
    agg = by.agg(["mean", "std", "count"]).reset_index()
    quantiles = {n: t_quantile(0.5 + LEVEL / 2, n - 1) for n in agg["count"].unique() if n > 1}
    half = agg["count"].map(quantiles).astype(float) * agg["std"] / np.sqrt(agg["count"])
    spread = agg[agg["count"] > 1]
    parts = [agg.assign(value=agg["mean"])]
    for end, sign in (("_lo", -1.0), ("_hi", 1.0)):
        parts.append(spread.assign(value=spread["mean"] + sign * half[spread.index],
                                   stat=spread["stat"].astype(str) + end))
    out = pd.concat(parts, ignore_index=True)
    return as_table_frame(out[["run_id", *KEY_COLUMNS, "value"]])
