"""compare_runs against hand computation on a small table and a plain-Python reference on a random one."""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pandas as pd
import pytest

from gpas_probe.analysis.summary import SUMMARY_COLUMNS, compare_runs

STRING_COLUMNS = ["run_id", "site", "direction", "stat"]


def _table(rows: list[tuple]) -> pd.DataFrame:
    data = pd.DataFrame(rows, columns=["run_id", "step", "layer", "site", "direction", "stat", "value"])
    return data.astype({"step": "int64", "layer": "int16", "value": "float64"})


def _hand_table() -> pd.DataFrame:
    rows = []
    # run "a": 4 layers, GPAS, val loss
    for step, loss in [(0, 5.0), (100, 4.0), (200, 3.0)]:
        rows.append(("a", step, -1, "model", "none", "loss", loss))
    rows.append(("a", 100, -1, "model", "none", "val_loss", 4.5))
    rows.append(("a", 250, -1, "model", "none", "tokens", 1e6))  # the run's last step
    for layer, (v100, v200) in enumerate([(1, 1), (2, 3), (4, 9), (8, 27)]):
        rows.append(("a", 100, layer, "resid_post", "fwd", "var", v100))
        rows.append(("a", 200, layer, "resid_post", "fwd", "var", v200))
        rows.append(("a", 200, layer, "resid_post", "bwd", "var", 1000.0))  # distractors
        rows.append(("a", 200, layer, "resid_pre", "fwd", "var", 1000.0))
        rows.append(("a", 200, layer, "resid_post", "fwd", "rms", 1000.0))
    for layer in range(4):
        rows.append(("a", 100, layer, "attn", "fwd", "shortcut_branch_ratio", 100.0))
        rows.append(("a", 200, layer, "attn", "fwd", "shortcut_branch_ratio", 1.0 + layer))
        rows.append(("a", 200, layer, "mlp", "fwd", "shortcut_branch_ratio", 2.0 + 2 * layer))
        rows.append(("a", 200, layer, "mlp", "fwd", "shortcut_branch_cos", 50.0))
    rows.append(("a", 200, 3, "attn", "fwd", "shortcut_branch_ratio", 6.0))  # duplicate of (attn, 3): mean 5
    for layer, (s100, s200) in enumerate([(0.5, 0.9), (0.5, 1.1), (0.5, 0.7), (0.5, 1.0)]):
        rows.append(("a", 100, layer, "gpas", "none", "scale", s100))
        rows.append(("a", 200, layer, "gpas", "none", "scale", s200))
        rows.append(("a", 200, layer, "gpas", "none", "alpha", 3.0))  # scale recorded: alpha not used
    # run "b": 8 layers, no val loss, no gates, ratio recorded later than var
    rows.append(("b", 40, -1, "model", "none", "loss", 6.0))
    rows.append(("b", 50, -1, "model", "none", "loss", 5.5))
    for layer in range(8):
        rows.append(("b", 50, layer, "resid_post", "fwd", "var", 2.0 ** layer))
        rows.append(("b", 60, layer, "attn", "fwd", "shortcut_branch_ratio", 10.0 * layer))
        rows.append(("b", 60, layer, "mlp", "fwd", "shortcut_branch_ratio", 20.0 * layer))
    # run "c": per-sub-layer gates with alpha only, nothing else but a loss
    rows.append(("c", 10, -1, "model", "none", "loss", 7.0))
    for layer, alpha in enumerate([-1.0, 0.5]):
        rows.append(("c", 10, layer, "gpas_attn", "none", "alpha", alpha))
        rows.append(("c", 10, layer, "gpas_mlp", "none", "alpha", 2 * alpha))
    return _table(rows)


def _scale(alpha: float) -> float:
    return 1.0 - alpha / (1.0 + math.exp(-alpha))


HAND = {
    "a": dict(final_val_loss=4.5, final_loss=3.0, steps=250, top_bottom_var_ratio=27.0,
              deep_ratio=(5.0 + 8.0) / 2, gate_min=0.7, gate_max=1.1),
    "b": dict(final_val_loss=5.5, final_loss=5.5, steps=60, top_bottom_var_ratio=2.0 ** 7,
              deep_ratio=(60 + 70 + 120 + 140) / 4, gate_min=math.nan, gate_max=math.nan),
    "c": dict(final_val_loss=7.0, final_loss=7.0, steps=10, top_bottom_var_ratio=math.nan, deep_ratio=math.nan,
              gate_min=min(_scale(a) for a in (-1.0, 0.5, -2.0, 1.0)),
              gate_max=max(_scale(a) for a in (-1.0, 0.5, -2.0, 1.0))),
}


@pytest.mark.parametrize("categorical", [False, True])
def test_compare_runs_matches_hand_computation(categorical):
    data = _hand_table()
    if categorical:
        data[STRING_COLUMNS] = data[STRING_COLUMNS].astype("category")
    out = compare_runs(data)
    assert list(out.columns) == list(SUMMARY_COLUMNS)
    assert list(out.index) == ["a", "b", "c"] and out.index.name == "run_id"
    assert out["steps"].dtype == np.int64
    expected = pd.DataFrame.from_dict(HAND, orient="index")[list(SUMMARY_COLUMNS)]
    pd.testing.assert_frame_equal(out, expected, check_names=False, check_dtype=False)


def _reference(data: pd.DataFrame) -> pd.DataFrame:
    """Plain-Python loops over records, written from the docstring."""
    recs = data.astype({c: str for c in STRING_COLUMNS}).to_dict("records")
    runs = list(dict.fromkeys(r["run_id"] for r in recs))

    def last_mean_by_key(pred):
        """{run: {(site, layer): mean value}} at that run's last step where pred holds."""
        last: dict[str, int] = {}
        for r in recs:
            if pred(r):
                last[r["run_id"]] = max(last.get(r["run_id"], -1), r["step"])
        acc: dict[str, dict] = defaultdict(lambda: defaultdict(list))
        for r in recs:
            if pred(r) and r["step"] == last[r["run_id"]]:
                acc[r["run_id"]][(r["site"], r["layer"])].append(r["value"])
        return {run: {k: sum(v) / len(v) for k, v in d.items()} for run, d in acc.items()}

    loss = last_mean_by_key(lambda r: r["site"] == "model" and r["stat"] == "loss")
    val = last_mean_by_key(lambda r: r["site"] == "model" and r["stat"] == "val_loss")
    var = last_mean_by_key(lambda r: (r["site"], r["direction"], r["stat"]) == ("resid_post", "fwd", "var")
                           and r["layer"] >= 0)
    ratio = last_mean_by_key(lambda r: r["site"] in ("attn", "mlp") and r["direction"] == "fwd"
                             and r["stat"] == "shortcut_branch_ratio" and r["layer"] >= 0)
    scale = last_mean_by_key(lambda r: r["site"].startswith("gpas") and r["stat"] == "scale")
    out = {}
    for run in runs:
        row = {}
        row["final_loss"] = np.mean(list(loss[run].values())) if run in loss else math.nan
        row["final_val_loss"] = np.mean(list(val[run].values())) if run in val else row["final_loss"]
        row["steps"] = max(r["step"] for r in recs if r["run_id"] == run)
        if run in var:
            layers = sorted(k[1] for k in var[run])
            row["top_bottom_var_ratio"] = var[run][("resid_post", layers[-1])] / var[run][("resid_post", layers[0])]
        else:
            row["top_bottom_var_ratio"] = math.nan
        if run in ratio:
            n = max(k[1] for k in ratio[run]) + 1
            deep = [v for (site, layer), v in ratio[run].items() if layer >= n - math.ceil(n / 4)]
            row["deep_ratio"] = sum(deep) / len(deep)
        else:
            row["deep_ratio"] = math.nan
        row["gate_min"] = min(scale[run].values()) if run in scale else math.nan
        row["gate_max"] = max(scale[run].values()) if run in scale else math.nan
        out[run] = row
    return pd.DataFrame.from_dict(out, orient="index")[list(SUMMARY_COLUMNS)]


def test_compare_runs_matches_reference_on_random_table():
    rng = np.random.default_rng(0)
    rows = []
    for run, n_layers in [("r0", 5), ("r1", 12), ("r2", 3)]:
        for step in sorted(rng.choice(1000, size=6, replace=False)):
            step = int(step)
            if rng.random() < 0.8:
                rows.append((run, step, -1, "model", "none", "loss", rng.uniform(2, 8)))
            if run != "r2" and rng.random() < 0.4:
                rows.append((run, step, -1, "model", "none", "val_loss", rng.uniform(2, 8)))
            for layer in range(n_layers):
                for _ in range(int(rng.integers(1, 3))):  # duplicated keys now and then
                    if rng.random() < 0.7:
                        rows.append((run, step, layer, "resid_post", "fwd", "var", rng.uniform(0.1, 10)))
                    for site in ("attn", "mlp"):
                        if rng.random() < 0.6:
                            rows.append((run, step, layer, site, "fwd", "shortcut_branch_ratio", rng.uniform(1, 50)))
                    if run != "r1" and rng.random() < 0.5:
                        rows.append((run, step, layer, "gpas", "none", "scale", rng.uniform(0.5, 1.2)))
    data = _table(rows)
    out = compare_runs(data)
    pd.testing.assert_frame_equal(out, _reference(data), check_names=False, check_dtype=False)
    assert out.loc["r1", ["gate_min", "gate_max"]].isna().all()


def test_compare_runs_rejects_bad_input():
    with pytest.raises(ValueError, match="missing columns"):
        compare_runs(_hand_table().drop(columns="value"))
    with pytest.raises(ValueError, match="no rows"):
        compare_runs(_hand_table().iloc[:0])
    with pytest.raises(ValueError, match="DataFrame"):
        compare_runs([1, 2])
