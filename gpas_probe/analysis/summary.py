"""One summary row per run from the long probe table (the numbers of the ``compare`` table)."""

from __future__ import annotations

import logging
import math

import pandas as pd

from gpas_probe.store.schema import check_table
from gpas_probe.table import gate_values, last_step, layer_rows, mean_by, select

logger = logging.getLogger(__name__)

SUMMARY_COLUMNS = ("final_val_loss", "final_loss", "steps", "top_bottom_var_ratio", "deep_ratio", "gate_min",
                   "gate_max")


def _last_step_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """Per run, the rows of the last step present in ``frame``; duplicates of one key averaged."""
    return mean_by(last_step(frame), ["run_id", "step", "site", "layer"])


def _last_value(frame: pd.DataFrame) -> pd.Series:
    """Per run, the mean value at that run's last step."""
    return _last_step_rows(frame).groupby("run_id")["value"].mean()


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

    out["final_loss"] = _last_value(select(data, stat="loss", site="model"))
    val = _last_value(select(data, stat="val_loss", site="model"))
    out["final_val_loss"] = val.reindex(out.index).fillna(out["final_loss"])

    steps = data.groupby("run_id", observed=True)["step"].max()
    steps.index = steps.index.astype(str)
    out["steps"] = steps.reindex(out.index).astype("int64")

    var = select(data, stat="var", site="resid_post", direction="fwd")
    var_rows = _last_step_rows(layer_rows(var))
    if not var_rows.empty:
        out["top_bottom_var_ratio"] = var_rows.groupby("run_id")[["layer", "value"]].apply(_top_bottom)

    ratio = select(data, stat="shortcut_branch_ratio", direction="fwd", site=["attn", "mlp"])
    ratio_rows = _last_step_rows(layer_rows(ratio))
    if not ratio_rows.empty:
        out["deep_ratio"] = ratio_rows.groupby("run_id")[["layer", "value"]].apply(_deep_mean)

    gates = last_step(gate_values(data, "scale"))
    if not gates.empty:
        out["gate_min"] = gates.groupby("run_id")["value"].min()
        out["gate_max"] = gates.groupby("run_id")["value"].max()
    return out

#: Short column headers of the comparison table, as ``gpas-probe compare`` and a report print it (the
#: frame keeps the documented names), and the legend under it.
COMPARE_LABELS = {"final_val_loss": "val", "final_loss": "train", "steps": "steps",
                  "top_bottom_var_ratio": "var ratio", "deep_ratio": "deep ratio",
                  "gate_min": "gate min", "gate_max": "gate max"}
COMPARE_LEGEND = ("val/train: final validation and training loss; var ratio: resid_post variance of the top layer "
                  "/ the bottom layer; deep ratio: mean shortcut/branch RMS ratio over the deepest quarter; "
                  "gate min/max: range of the GPAS scale 1 - SiLU(alpha) over layers (last step).")
SEED_LEGEND = "val 95%: interval of the mean final validation loss across seeds (Student's t). "
