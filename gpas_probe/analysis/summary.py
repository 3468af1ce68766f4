"""One summary row per run from the long probe table (the numbers of the ``compare`` table)."""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd

from gpas_probe.store import check_table

logger = logging.getLogger(__name__)

GATE_SITES = ("gpas", "gpas_attn", "gpas_mlp")
SUMMARY_COLUMNS = ("final_val_loss", "final_loss", "steps", "top_bottom_var_ratio", "deep_ratio", "gate_min",
                   "gate_max")


def _select(data: pd.DataFrame, **equal: object) -> pd.DataFrame:
    """Rows where each column equals the value (or is in the list), filtering one column at a time."""
    out = data
    for column, want in equal.items():
        col = out[column]
        mask = col.isin(want) if isinstance(want, list) else col == want
        out = out[np.asarray(mask, dtype=bool)]
    return out


def _last_step_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """Per run, the rows of the last step present in ``frame``; duplicates of one key averaged."""
    if frame.empty:
        return frame.assign(run_id=frame["run_id"].astype(str))
    frame = frame.assign(run_id=frame["run_id"].astype(str), site=frame["site"].astype(str))
    last = frame.groupby("run_id")["step"].transform("max")
    frame = frame[frame["step"].to_numpy() == last.to_numpy()]
    return frame.groupby(["run_id", "step", "site", "layer"], sort=True)["value"].mean().reset_index()


def _last_value(frame: pd.DataFrame) -> pd.Series:
    """Per run, the mean value at that run's last step."""
    rows = _last_step_rows(frame)
    return rows.groupby("run_id")["value"].mean()


def _top_bottom(rows: pd.DataFrame) -> float:
    by_layer = rows.groupby("layer")["value"].mean()
    return float(by_layer.iloc[-1] / by_layer.iloc[0]) if len(by_layer) else math.nan


def _deep_mean(rows: pd.DataFrame) -> float:
    n_layers = int(rows["layer"].max()) + 1
    first_deep = n_layers - math.ceil(n_layers / 4)
    return float(rows.loc[rows["layer"] >= first_deep, "value"].mean())


def compare_runs(data: pd.DataFrame) -> pd.DataFrame:
    """One row per run (index ``run_id``, in order of first appearance) summarising the long table.

    Every "last step" is the last step at which that quantity was recorded for that run (statistics may
    be recorded at different cadences); rows repeated for one (step, layer, site) are averaged first.

    Columns:
        final_val_loss: ``val_loss`` (site ``model``) at the last step it was recorded; where a run has no
            ``val_loss``, its ``final_loss``.
        final_loss: training ``loss`` (site ``model``) at its last recorded step; NaN without loss rows.
        steps: the largest ``step`` in any row of the run (int).
        top_bottom_var_ratio: ``var`` at ``resid_post``/``fwd`` of the deepest recorded layer divided by that
            of the shallowest (layer 0), at the last step with such rows; NaN without them.
        deep_ratio: mean ``shortcut_branch_ratio`` (``fwd``) over ``attn`` and ``mlp`` and over the deepest
            quarter of the layers (the last ``ceil(L/4)`` of ``L = max layer + 1``), at the last step with
            ratio rows; NaN without them.
        gate_min, gate_max: smallest and largest GPAS ``scale`` (``1 - SiLU(alpha)``) over layers and gate
            sites (``gpas``, ``gpas_attn``, ``gpas_mlp``) at the last step with gate rows; computed from
            ``alpha`` when ``scale`` was not recorded; NaN for a run without gates.
    """
    check_table(data)

    runs = [str(r) for r in pd.unique(data["run_id"])]
    out = pd.DataFrame(index=pd.Index(runs, name="run_id"), columns=list(SUMMARY_COLUMNS), dtype=float)

    out["final_loss"] = _last_value(_select(data, stat="loss", site="model"))
    val = _last_value(_select(data, stat="val_loss", site="model"))
    out["final_val_loss"] = val.reindex(out.index).fillna(out["final_loss"])

    steps = data.groupby("run_id", observed=True)["step"].max()
    steps.index = steps.index.astype(str)
    out["steps"] = steps.reindex(out.index).astype("int64")

    var = _select(data, stat="var", site="resid_post", direction="fwd")
    var_rows = _last_step_rows(var[var["layer"].to_numpy() >= 0])
    if not var_rows.empty:
        out["top_bottom_var_ratio"] = var_rows.groupby("run_id")[["layer", "value"]].apply(_top_bottom)

    ratio = _select(data, stat="shortcut_branch_ratio", direction="fwd", site=["attn", "mlp"])
    ratio_rows = _last_step_rows(ratio[ratio["layer"].to_numpy() >= 0])
    if not ratio_rows.empty:
        out["deep_ratio"] = ratio_rows.groupby("run_id")[["layer", "value"]].apply(_deep_mean)

    gates = _gate_scales(data)
    if not gates.empty:
        gate_rows = _last_step_rows(gates)
        out["gate_min"] = gate_rows.groupby("run_id")["value"].min()
        out["gate_max"] = gate_rows.groupby("run_id")["value"].max()
    return out


def _gate_scales(data: pd.DataFrame) -> pd.DataFrame:
    """Gate ``scale`` rows, with ``1 - SiLU(alpha)`` standing in for runs/sites that recorded only alpha."""
    rows = _select(data, site=list(GATE_SITES), stat=["scale", "alpha"])
    rows = rows[rows["layer"].to_numpy() >= 0].assign(run_id=lambda f: f["run_id"].astype(str),
                                                       site=lambda f: f["site"].astype(str),
                                                       stat=lambda f: f["stat"].astype(str))
    scale = rows[rows["stat"] == "scale"]
    have = pd.MultiIndex.from_frame(scale[["run_id", "site"]])
    alpha = rows[(rows["stat"] == "alpha").to_numpy() & ~pd.MultiIndex.from_frame(rows[["run_id", "site"]]).isin(have)]
    if not alpha.empty:
        a = alpha["value"].to_numpy(dtype=float)
        alpha = alpha.assign(value=1.0 - a / (1.0 + np.exp(-a)), stat="scale")
        scale = pd.concat([scale, alpha], ignore_index=True)
    return scale
