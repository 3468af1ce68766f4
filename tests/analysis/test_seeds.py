"""Comparisons across seeds: grouping by configuration, means with their interval across seeds, paired
differences, and the long table aggregated per group, each against a per-run computation."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pandas as pd
import pytest

from gpas_probe.analysis.seeds import configuration, group_runs, grouped, paired_differences, seed_summary
from gpas_probe.intervals import t_quantile
from gpas_probe.table import aggregate_runs


def _meta(seed: int, gpas: bool = False, device: str = "cpu", lr: float = 1e-3) -> dict:
    return {"model_config": {"norm": "pre", "gpas": gpas}, "train_config": {"seed": seed, "lr": lr, "device": device}}


def _runs(values: dict[str, list[float]]) -> pd.DataFrame:
    """Model rows of runs ``name-seed{i}``: a validation loss per run, training losses over three steps."""
    rows = []
    for name, finals in values.items():
        for seed, final in enumerate(finals):
            run = f"{name}-seed{seed}"
            for step in (1, 2, 3):
                rows.append((run, step, "loss", final + 1.0 / step))
            rows.append((run, 3, "val_loss", final))
    frame = pd.DataFrame(rows, columns=["run_id", "step", "stat", "value"])
    return frame.assign(layer=-1, site="model", direction="none")[
        ["run_id", "step", "layer", "site", "direction", "stat", "value"]]


def test_runs_group_by_configuration_whatever_their_seed_and_device() -> None:
    metas = {"pre-seed0": _meta(0), "pre-seed1": _meta(1, device="cuda"), "gpas-seed0": _meta(0, gpas=True),
             "gpas-seed1": _meta(1, gpas=True), "other-lr": _meta(0, lr=3e-3), "profile": {"kind": "profile"}}
    groups = group_runs(metas)
    assert groups == {"pre-seed0": "pre", "pre-seed1": "pre", "gpas-seed0": "gpas", "gpas-seed1": "gpas",
                      "other-lr": "other-lr", "profile": "profile"}
    assert grouped(groups) and not grouped({"a": "a", "b": "b"})
    assert configuration({"kind": "profile"}) is None
    assert configuration(_meta(0)) == configuration(_meta(7, device="cuda"))


def _interval(values: list[float]) -> tuple[float, float]:
    mean, n = statistics.fmean(values), len(values)
    half = t_quantile(0.975, n - 1) * statistics.stdev(values) / math.sqrt(n)
    return mean - half, mean + half


def test_seed_summary_is_the_mean_with_its_interval_across_seeds() -> None:
    values = {"pre": [2.0, 2.1, 1.95], "gpas": [1.9, 2.02, 1.88]}
    data = _runs(values)
    groups = {f"{n}-seed{i}": n for n, v in values.items() for i in range(len(v))}
    out = seed_summary(data, groups)
    assert out.index.tolist() == ["pre", "gpas"] and out["runs"].tolist() == [3, 3]
    for name, finals in values.items():
        assert out.loc[name, "final_val_loss"] == pytest.approx(statistics.fmean(finals))
        assert (out.loc[name, "val_lo"], out.loc[name, "val_hi"]) == pytest.approx(_interval(finals))
        assert out.loc[name, "final_loss"] == pytest.approx(statistics.fmean(finals) + 1 / 3)


def test_paired_differences_pair_runs_by_seed() -> None:
    values = {"pre": [2.0, 2.1, 1.95, 2.05], "gpas": [1.9, 2.02, 1.88, 1.96], "noisy": [2.1, 1.9, 2.2, 1.8]}
    data = _runs(values)
    groups = {f"{n}-seed{i}": n for n, v in values.items() for i in range(len(v))}
    seeds = {f"{n}-seed{i}": i for n, v in values.items() for i in range(len(v))}
    out = paired_differences(data, groups, seeds)
    assert out.index.tolist() == ["gpas - pre", "noisy - pre"]
    for name in ("gpas", "noisy"):
        diffs = [b - a for a, b in zip(values["pre"], values[name], strict=True)]
        row = out.loc[f"{name} - pre"]
        assert row["pairs"] == 4 and row["difference"] == pytest.approx(statistics.fmean(diffs))
        assert (row["lo"], row["hi"]) == pytest.approx(_interval(diffs))
    assert out.loc["gpas - pre", "beyond_noise"] and not out.loc["noisy - pre", "beyond_noise"]
    missing_seed = {k: v for k, v in seeds.items() if k != "gpas-seed3"}
    assert paired_differences(data, groups, missing_seed).loc["gpas - pre", "pairs"] == 3  # only shared seeds


def test_aggregate_runs_is_the_per_step_mean_with_its_interval() -> None:
    rng = np.random.default_rng(0)
    rows = []
    for run in ("a-seed0", "a-seed1", "a-seed2", "b"):
        for step in (1, 2):
            for layer in range(3):
                rows.append((run, step, layer, "resid_post", "fwd", "var", float(rng.uniform(1, 2))))
                rows.append((run, step, layer, "resid_post", "fwd", "var_lo", 0.0))  # a run's own interval: dropped
    data = pd.DataFrame(rows, columns=["run_id", "step", "layer", "site", "direction", "stat", "value"])
    out = aggregate_runs(data, {"a-seed0": "a", "a-seed1": "a", "a-seed2": "a"})
    assert set(out["run_id"]) == {"a", "b"} and list(out.columns) == list(data.columns)
    got = out.set_index(["run_id", "step", "layer", "stat"])["value"]
    for step in (1, 2):
        for layer in range(3):
            values = [v for r, s, lay, _, _, st, v in rows if r.startswith("a-") and s == step and lay == layer
                      and st == "var"]
            lo, hi = _interval(values)
            assert got[("a", step, layer, "var")] == pytest.approx(statistics.fmean(values))
            assert (got[("a", step, layer, "var_lo")], got[("a", step, layer, "var_hi")]) == pytest.approx((lo, hi))
    b = out[out["run_id"] == "b"]
    assert set(b["stat"]) == {"var"} and len(b) == 6  # one run: its values, no interval
