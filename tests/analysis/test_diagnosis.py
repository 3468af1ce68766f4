"""``diagnose``: the verdict and per-layer flags against a brute-force reading of the documented rule, the
growth fit against numpy.polyfit, missing signals, threshold overrides, JSON, real tables from a trained
tiny model plus its layer importance, and the ``gpas-probe diagnose`` command."""

from __future__ import annotations

import json
import math
import statistics

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from diagnosis_tables import L, healthy_table, table, underused_table

from gpas_probe import ModelConfig, TrainConfig, build_model, train
from gpas_probe.analysis import layer_importance, to_long
from gpas_probe.analysis.diagnosis import (
    SIGNAL_NAMES,
    VERDICTS,
    Diagnosis,
    Thresholds,
    diagnose,
    diagnose_runs,
)
from gpas_probe.analysis.growth import fit_growth
from gpas_probe.probes import ProbeConfig
from gpas_probe.store import ARROW_SCHEMA, load_run

# ------------------------------------------------------------------------------------------- verdicts


def test_constructed_underuse_is_found_and_decided_by_deletion() -> None:
    d = diagnose(underused_table())
    assert isinstance(d, Diagnosis) and d.verdict == "underuse" and d.underused and d.run_id == "sick"
    deep = d.layers[d.layers["layer"] >= L // 2]
    assert (deep["status"] == "underused").all() and (deep["decided_by"] == "deletion").all()
    assert (deep["deletion_level"] == "low").all() and (deep["angular_level"] == "low").all()
    assert (d.layers.loc[d.layers["layer"] < L // 2, "status"] == "used").all()
    assert d.summary["decided_by"] == "deletion" and d.summary["causal"]
    assert d.summary["fraction_underused"] == 1.0 and d.summary["deep_layers"] == list(range(L // 2, L))
    assert d.summary["signals_used"] == list(SIGNAL_NAMES) and d.summary["signals_missing"] == {}
    assert d.summary["growth_factor"] == pytest.approx(2.0)
    np.testing.assert_allclose(d.layers["ratio"], 2 + 4.0 * np.arange(L))  # mean of attn and mlp
    np.testing.assert_allclose(d.layers["var_rel"], 2.0 ** np.arange(L))
    # the correlational signals still explain: they fire in the deep half
    assert deep[["flag_ratio", "flag_grad"]].all().all()


def test_healthy_profile_is_ok() -> None:
    d = diagnose(healthy_table())
    assert d.verdict == "ok" and not d.underused and (d.layers["status"] == "used").all()
    assert d.summary["fraction_underused"] == 0.0 and d.summary["underused_layers"] == []
    assert abs(d.summary["growth_rate"]) < 0.05


def test_growth_fit_matches_polyfit() -> None:
    rng = np.random.default_rng(3)
    var = np.exp(0.3 + 0.17 * np.arange(L) + 0.2 * rng.standard_normal(L))
    d = diagnose(table(var=var))
    slope, intercept = np.polyfit(np.arange(L), np.log(var), 1)
    r2 = np.corrcoef(np.arange(L), np.log(var))[0, 1] ** 2
    assert d.summary["growth_rate"] == pytest.approx(slope, rel=1e-9)
    assert d.summary["growth_intercept"] == pytest.approx(intercept, rel=1e-9)
    assert d.summary["growth_factor"] == pytest.approx(math.exp(slope), rel=1e-9)
    assert d.summary["growth_r2"] == pytest.approx(r2, rel=1e-9)
    b, _, _ = fit_growth(np.arange(L), np.where(np.arange(L) == 3, -1.0, var))  # non-positive values skipped
    keep = np.arange(L) != 3
    assert b == pytest.approx(np.polyfit(np.arange(L)[keep], np.log(var[keep]), 1)[0], rel=1e-9)
    assert math.isnan(fit_growth(np.array([0]), np.array([1.0]))[0])
    assert all(math.isnan(v) for v in fit_growth(np.array([0, 1]), np.array([1.0, 2.0])))  # a line through 2 points
    assert math.isfinite(fit_growth(np.array([0, 1, 2]), np.array([1.0, 2.0, 3.0]))[0])


def _reference(value: np.ndarray, lo: np.ndarray, hi: np.ndarray, absolute: float, relative: float,
               min_fraction: float) -> tuple[list[str], str]:
    """The documented causal rule, layer by layer with plain Python: (status per layer, verdict)."""
    median = statistics.median(value)
    tau = max(absolute, relative * median)
    status = []
    for i in range(L):
        if lo[i] >= tau or lo[i] > median:
            status.append("used")
        elif hi[i] < tau:
            status.append("underused")
        else:
            status.append("inconclusive")
    deep = status[L // 2:]
    need = max(1, math.ceil(min_fraction * len(deep)))
    under, open_ = deep.count("underused"), deep.count("inconclusive")
    verdict = "underuse" if under >= need else "ok" if under + open_ < need else "inconclusive"
    return status, verdict


@pytest.mark.parametrize("seed", range(8))
def test_status_and_verdict_follow_the_documented_rule(seed: int) -> None:
    rng = np.random.default_rng(seed)
    value = rng.uniform(-0.01, 0.2, L)
    half = rng.uniform(0.0, 0.05, L)
    th = Thresholds(min_fraction=float(rng.choice([0.25, 0.5, 0.75])), min_deletion=float(rng.choice([0.01, 0.05])))
    d = diagnose(table(deletion=value, half_width=half, var=np.exp(rng.uniform(0, 3, L)),
                       ratio=rng.uniform(1, 20, L), grad=rng.uniform(0.1, 2, L)), th)
    status, verdict = _reference(value, value - half, value + half, th.min_deletion, th.min_deletion_rel,
                                 th.min_fraction)
    assert d.layers["status"].tolist() == status
    assert d.verdict == verdict
    np.testing.assert_allclose(d.layers["deletion_lo"], value - half)
    np.testing.assert_allclose(d.layers["deletion_hi"], value + half)


def test_correlational_signals_never_outvote_causal_evidence() -> None:
    # The failure this rule fixes: a sink token makes variance and ratio fire in every deep layer and a
    # noisy gradient fires in some, while deleting any layer clearly costs loss. A vote over all five
    # signals called that underuse; causal evidence first calls it ok.
    deep = np.arange(L) >= L // 2
    data = table(var=np.full(L, 300.0) * (np.arange(L) > 0) + 1.0, ratio=np.where(np.arange(L) > 1, 60.0, 3.0),
                 grad=np.where(deep & (np.arange(L) % 2 == 0), 0.2, 1.0), deletion=np.linspace(0.5, 0.2, L),
                 angular=np.linspace(0.2, 0.04, L), half_width=0.01)
    d = diagnose(data)
    assert d.verdict == "ok" and (d.layers["status"] == "used").all()
    assert d.layers.loc[deep, ["flag_variance", "flag_ratio"]].all().all()  # they still fire, and explain


def test_a_layer_clearly_in_the_top_half_is_never_underused() -> None:
    value = np.linspace(0.8, 0.1, L)
    d = diagnose(table(deletion=value, half_width=0.01), Thresholds(min_deletion=10.0))  # an absurd floor
    top = value - 0.01 > np.median(value)
    assert (d.layers.loc[top, "status"] == "used").all() and top.sum() == L // 2
    assert (d.layers.loc[~top, "status"] == "underused").all()


def test_wide_intervals_are_inconclusive_with_advice() -> None:
    deep = np.arange(L) >= L // 2
    value = np.where(deep, 0.1, 0.4)
    d = diagnose(table(deletion=value, half_width=np.where(deep, 0.06, 0.05), tokens=512))
    assert d.verdict == "inconclusive" and d.summary["inconclusive_layers"] == list(range(L // 2, L))
    # threshold 0.25 x median 0.25 = 0.0625; the deep layers sit 0.0375 above it with half-width 0.06:
    # 512 tokens x 4 x (0.06 / 0.0375)^2 = 5,243 -> the next power of two, 8,192
    assert d.summary["advised_tokens"] == 8_192 and "8,192 evaluation tokens (now 512)" in d.summary["advice"]
    narrow = diagnose(table(deletion=value, half_width=np.where(deep, 0.005, 0.05), tokens=8_192))
    assert narrow.verdict == "ok" and narrow.summary["advice"] is None


def test_relative_thresholds_use_the_median_layer() -> None:
    values = np.array([5.0, 0.4, 0.4, 0.4, 0.08, 0.08, 0.08, 0.05])  # median 0.24, mean 0.82
    th = Thresholds(min_deletion=0.0, min_deletion_rel=0.25, min_angular=0.0, min_angular_rel=0.25)
    d = diagnose(table(deletion=values, angular=values), th)
    expected = (values < 0.25 * 0.24).tolist()
    assert expected == [False] * 7 + [True]
    assert (d.layers["status"] == "underused").tolist() == expected
    assert d.summary["thresholds_used"]["deletion"] == pytest.approx(0.06)
    d = diagnose(table(deletion=values), Thresholds(min_deletion=0.1, min_deletion_rel=0.0))
    assert (d.layers["status"] == "underused").tolist() == (values < 0.1).tolist()  # the absolute floor alone


def test_angular_decides_only_without_deletion() -> None:
    deep = np.arange(L) >= L // 2
    d = diagnose(table(angular=np.where(deep, 0.01, 0.2), half_width=0.005))
    assert d.summary["decided_by"] == "angular" and d.verdict == "underuse"
    both = diagnose(table(deletion=np.full(L, 0.3), angular=np.where(deep, 0.01, 0.2), half_width=0.005))
    assert both.summary["decided_by"] == "deletion" and both.verdict == "ok"  # deletion outranks the angle


# ------------------------------------------------------------------------------------- missing signals


def test_training_run_has_no_importance_and_says_so() -> None:
    deep = np.arange(L) >= L // 2
    d = diagnose(table(var=4.0 ** np.arange(L), ratio=np.where(deep, 30.0, 2.0), grad=np.ones(L)))
    assert d.summary["signals_used"] == ["variance", "ratio", "grad"]
    assert set(d.summary["signals_missing"]) == {"deletion", "angular"}
    assert d.summary["flags_needed"] == 2 and (d.layers["signals"] == 3).all()
    assert d.layers["deletion_delta"].isna().all()
    assert d.verdict == "underuse" and d.summary["decided_by"] == "correlational" and not d.summary["causal"]
    assert d.layers.loc[deep, "underused"].all() and (d.layers["decided_by"] == "correlational").all()


def _correlational_reference(ev: dict[str, np.ndarray], th: Thresholds) -> tuple[list[dict[str, bool]], list[bool]]:
    """The documented vote, layer by layer with plain Python."""
    grad_base = statistics.median(ev["grad"][i] for i in range(L) if i < L // 2)
    flags, under = [], []
    for i in range(L):
        f = {"variance": ev["var"][i] / ev["var"][0] > th.max_var_rel, "ratio": ev["ratio"][i] > th.max_ratio,
             "grad": ev["grad"][i] / grad_base < th.min_grad_rel}
        flags.append(f)
        under.append(sum(f.values()) >= (th.min_flags if th.min_flags is not None else 2))
    return flags, under


@pytest.mark.parametrize("seed", range(6))
def test_the_correlational_vote_follows_the_documented_rule(seed: int) -> None:
    rng = np.random.default_rng(seed)
    ev = {"var": np.exp(rng.uniform(0, 3, L)), "ratio": rng.uniform(1, 20, L), "grad": rng.uniform(0.1, 2, L)}
    th = Thresholds(min_flags=[None, 1, 3][seed % 3])
    d = diagnose(table(var=ev["var"], ratio=ev["ratio"], grad=ev["grad"]), th)
    flags, under = _correlational_reference(ev, th)
    for s in ("variance", "ratio", "grad"):
        assert d.layers[f"flag_{s}"].tolist() == [f[s] for f in flags], s
    assert d.layers["underused"].tolist() == under
    deep = under[L // 2:]
    assert d.verdict == ("underuse" if sum(deep) >= math.ceil(th.min_fraction * len(deep)) else "ok")


def test_the_robust_variance_is_read_when_recorded() -> None:
    sink = np.full(L, 1.0)
    sink[2:] = 400.0  # a sink token from layer 2 on
    d = diagnose(table(var=sink, var_robust=1.0 + 0.1 * np.arange(L)))
    assert d.summary["statistics_read"]["variance"] == "var_robust"
    np.testing.assert_allclose(d.layers["var"], 1.0 + 0.1 * np.arange(L))
    assert not d.layers["flag_variance"].any()


def test_angular_falls_back_to_block_influence() -> None:
    influence = np.linspace(0.3, 1e-3, L)
    d = diagnose(table(deletion=np.full(L, 0.2), influence=influence, half_width=1e-4))
    assert d.summary["angular_source"] == "block_influence" and "angular" in d.summary["signals_used"]
    np.testing.assert_allclose(d.layers["angular"], np.arccos(1 - influence) / np.pi)
    np.testing.assert_allclose(d.layers["angular_hi"], np.arccos(1 - influence - 1e-4) / np.pi)
    np.testing.assert_allclose(d.layers["block_influence"], influence)
    d = diagnose(underused_table())
    assert d.summary["angular_source"] == "angular_distance"  # the angle itself wins when recorded


def test_no_per_layer_signal_is_insufficient_data() -> None:
    d = diagnose(table())
    assert d.verdict == "insufficient data" and d.summary["signals_used"] == []
    assert set(d.summary["signals_missing"]) == set(SIGNAL_NAMES)
    one_layer = underused_table()
    d = diagnose(one_layer[one_layer["layer"] <= 0])
    assert d.verdict == "insufficient data"
    assert d.summary["reason"] == "1 layer: too few to compare shallow and deep layers"


def test_step_picks_the_evidence_and_signals_absent_there_are_missing() -> None:
    data = pd.concat([underused_table(step=10), healthy_table("sick", step=20)], ignore_index=True)
    assert diagnose(data).verdict == "ok" and diagnose(data).summary["steps"]["ratio"] == 20
    assert diagnose(data, step=10).verdict == "underuse"
    with pytest.raises(ValueError, match=r"^step 15 was not recorded in sick; recorded steps: 10, 20$"):
        diagnose(data, step=15)
    d = diagnose(pd.concat([data, table("sick", 15, deletion=np.full(L, 0.3))]), step=15)
    assert d.verdict == "ok" and "at step 15" in d.summary["signals_missing"]["ratio"]  # step 15 has deletion only
    mixed = pd.concat([table("m", 10, var=2.0 ** np.arange(L)), table("m", 30, deletion=np.full(L, 0.3))])
    assert diagnose(mixed).summary["steps"] == {"deletion": 30, "variance": 10}  # each at its own last step


# ------------------------------------------------------------------------------------------ thresholds


def test_threshold_overrides_change_the_verdict() -> None:
    deep = np.arange(L) >= L // 2
    data = table(var=np.ones(L), ratio=np.where(deep, 8.0, 2.0), grad=np.where(deep, 0.4, 1.0))
    d = diagnose(data)
    assert d.verdict == "ok"  # only the gradient fires (ratio 8 < 10), and one of three signals is not enough
    assert not d.layers["flag_ratio"].any() and d.layers.loc[deep, "flag_grad"].all()
    assert diagnose(data, Thresholds(max_ratio=5.0)).verdict == "underuse"
    assert diagnose(data, Thresholds(min_flags=1)).verdict == "underuse"
    assert diagnose(data, Thresholds(max_ratio=5.0, min_grad_rel=0.3)).verdict == "ok"
    assert diagnose(underused_table(), Thresholds(min_deletion=-1, min_deletion_rel=0)).verdict == "ok"
    half = underused_table()
    half = half[~((half["layer"] >= L - 2) & (half["site"] != "model"))]  # the deep half is half underused
    assert diagnose(half).verdict == "underuse"
    assert diagnose(half, Thresholds(min_fraction=0.75)).verdict == "ok"


@pytest.mark.parametrize("bad", [{"max_ratio": 0}, {"min_fraction": 1.5}, {"min_flags": 0}, {"min_angular": -1},
                                 {"min_deletion": float("nan")}])
def test_bad_thresholds_are_value_errors(bad: dict) -> None:
    with pytest.raises(ValueError, match="threshold"):
        Thresholds(**bad)


# ------------------------------------------------------------------------------------- runs and JSON


def test_several_runs() -> None:
    data = pd.concat([healthy_table(), underused_table()], ignore_index=True)
    results = diagnose_runs(data)
    assert list(results) == ["fine", "sick"]
    assert [d.verdict for d in results.values()] == ["ok", "underuse"]
    assert diagnose(data, run="sick").verdict == "underuse"
    with pytest.raises(ValueError, match="pass run="):
        diagnose(data)
    with pytest.raises(ValueError, match="not in the data"):
        diagnose(data, run="nope")


def test_to_dict_is_json_safe_and_round_trips() -> None:
    data = table(var=2.0 ** np.arange(L), ratio=np.full(L, 3.0))  # NaN evidence columns
    for d in (diagnose(data), diagnose(underused_table())):
        out = d.to_dict()
        text = json.dumps(out, allow_nan=False)
        back = json.loads(text)
        assert back == out and back["verdict"] == d.verdict and len(back["layers"]) == L
        assert back["summary"]["thresholds"] == Thresholds().to_dict()
        first = back["layers"][0]
        assert isinstance(first["underused"], bool) and isinstance(first["layer"], int)
    assert json.loads(json.dumps(diagnose(data).to_dict()))["layers"][0]["deletion_delta"] is None


@pytest.mark.parametrize("bad", [None, pd.DataFrame({"x": [1]}), table().iloc[:0]])
def test_bad_tables(bad) -> None:
    with pytest.raises(ValueError):
        diagnose(bad)


# ----------------------------------------------------------------------------------------- real tables


def _batches(seed: int = 5) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (4, 24), generator=g)
    return [(ids[:, :-1], ids[:, 1:])]


@pytest.fixture(scope="module")
def profiled_run(tmp_path_factory) -> tuple:
    """A tiny Pre-LN run with probes, plus its final model's layer importance written as a profile would."""
    out = tmp_path_factory.mktemp("diag") / "run"
    config = ModelConfig.from_preset("tiny")
    train(config, TrainConfig(steps=6, batch_size=4, seq_len=32, eval_every=0, eval_batches=1), out=out,
          probe=ProbeConfig(every=3))
    model = build_model(config)
    torch.manual_seed(0)
    imp = layer_importance(model, _batches(), normalize_rows=True)
    long = pd.concat([to_long(f, "run", 6) for f in imp.values()], ignore_index=True)
    pq.write_table(pa.Table.from_pandas(long, schema=ARROW_SCHEMA, preserve_index=False),
                   out / "probes" / "part-000999.parquet")
    return out, imp


def test_real_tables_are_read_as_recorded(profiled_run) -> None:
    out, imp = profiled_run
    data = load_run(out)
    d = diagnose(data)
    assert d.summary["signals_used"] == list(SIGNAL_NAMES) and d.verdict in VERDICTS
    np.testing.assert_allclose(d.layers["deletion_delta"], imp["deletion"]["delta"])
    np.testing.assert_allclose(d.layers["deletion_lo"], imp["deletion"]["delta_lo"])
    np.testing.assert_allclose(d.layers["deletion_hi"], imp["deletion"]["delta_hi"])
    n1 = imp["angular"][imp["angular"]["n"] == 1].sort_values("layer")
    np.testing.assert_allclose(d.layers["angular"], n1["distance"])
    np.testing.assert_allclose(d.layers["block_influence"], imp["block_influence"]["influence"])
    var = data[(data.stat == "var") & (data.site == "resid_post") & (data.direction == "fwd") & (data.step == 6)]
    np.testing.assert_allclose(d.layers["var"], var.sort_values("layer")["value"])
    grad = data[(data.stat == "grad_norm") & (data.site == "params") & (data.step == 6)].sort_values("layer")
    np.testing.assert_allclose(d.layers["grad_rel"], grad["value"] / np.median(grad["value"].to_numpy()[:2]))
    train_only = diagnose(data[data["site"] != "importance"])
    assert "deletion" in train_only.summary["signals_missing"]
