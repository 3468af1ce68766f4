"""Issue 4's end-to-end path: train -> profile -> diagnose -> plot importance/angular, on the CLI."""

from __future__ import annotations

import json

import pytest
from helpers import assert_figure_file
from typer.testing import CliRunner

from gpas_probe.cli.main import app
from gpas_probe.store import load_run

runner = CliRunner()


def _ok(args: list[str]) -> str:
    res = runner.invoke(app, args)
    assert res.exit_code in (0, 1), res.output  # diagnose --strict may exit 1
    return res.output


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow")
    run = root / "run"
    _ok(["train", "--preset", "tiny", "--gpas", "--steps", "6", "--checkpoint-every", "3", "--probe-every", "3",
         "--out", str(run)])
    out = root / "profiles"
    _ok(["profile", str(run), "--out", str(out), "--batches", "2", "--batch-size", "2", "--seq-len", "32"])
    return run, out / "run"


def test_profile_writes_importance_over_training(profiled):
    _, prof = profiled
    df = load_run(prof)
    assert sorted(df["step"].unique()) == [3, 6]  # one step per checkpoint of the run
    stats = set(df["stat"])
    assert {"deletion_delta", "block_influence", "angular_distance", "var", "val_loss"} <= stats
    assert set(df.loc[df["stat"] == "deletion_delta", "layer"]) == {0, 1, 2, 3}


def test_diagnose_profile_and_training_run(profiled):
    run, prof = profiled
    for target in (prof, run):
        text = _ok(["diagnose", str(target)])
        assert "verdict" in text.lower()
    data = json.loads(_ok(["diagnose", str(prof), "--json"]))
    assert data["runs"][0]["verdict"] in {"underuse", "ok", "insufficient data"}
    strict = runner.invoke(app, ["diagnose", str(prof), "--strict"])
    assert strict.exit_code == (1 if data["runs"][0]["verdict"] == "underuse" else 0)


@pytest.mark.parametrize("kind", ["importance", "angular", "importance-steps"])
def test_plot_importance_figures(profiled, tmp_path, kind):
    _, prof = profiled
    target = tmp_path / f"{kind}.png"
    _ok(["plot", kind, str(prof), "-o", str(target)])
    assert_figure_file(target, kind, load_run(prof))


def test_plot_importance_on_a_training_run_says_profile_first(profiled, tmp_path):
    run, _ = profiled
    res = runner.invoke(app, ["plot", "importance", str(run), "-o", str(tmp_path / "x.png")])
    assert res.exit_code == 2 and "profile" in res.output and "Traceback" not in res.output


@pytest.mark.parametrize("mode", ["estimate", "both"])
def test_importance_modes_reach_diagnose(profiled, tmp_path, mode):
    """``--importance estimate`` records the estimate in place of exact deletion and diagnose decides on it;
    ``both`` records both and diagnose reports how well the estimate ranks the layers."""
    run, _ = profiled
    res = runner.invoke(app, ["profile", str(run), "--latest", "--out", str(tmp_path), "--batches", "2",
                              "--batch-size", "2", "--seq-len", "32", "--importance", mode, "--no-activations"])
    assert res.exit_code == 0, res.output
    df = load_run(tmp_path / "run")
    assert ("deletion_delta" in set(df["stat"])) == (mode == "both")
    assert {"deletion_estimate", "deletion_estimate_lo", "deletion_estimate_hi"} <= set(df["stat"])
    summary = json.loads(_ok(["diagnose", str(tmp_path / "run"), "--json"]))["runs"][0]["summary"]
    assert summary["statistics_read"]["deletion"] == ("deletion_delta" if mode == "both" else "deletion_estimate")
    text = _ok(["diagnose", str(tmp_path / "run")])
    if mode == "both":
        rho = summary["estimate_agreement"]["spearman"]
        assert -1 <= rho <= 1 and summary["estimate_agreement"]["layers"] == 4
        assert f"Spearman {rho:.3f} over 4 layers" in text
    else:
        assert summary["estimate_agreement"] is None and "Spearman" not in text


def test_unknown_importance_mode_is_one_line(profiled, tmp_path):
    run, _ = profiled
    res = runner.invoke(app, ["profile", str(run), "--out", str(tmp_path), "--importance", "approx"])
    assert res.exit_code == 2 and "approx" in res.output and "Traceback" not in res.output


def test_stream_gives_the_rows_of_the_in_memory_profile(profiled, tmp_path):
    run, prof = profiled
    res = runner.invoke(app, ["profile", str(run), "--out", str(tmp_path), "--batches", "2", "--batch-size", "2",
                              "--seq-len", "32", "--stream"])
    assert res.exit_code == 0, res.output
    key = ["step", "layer", "site", "direction", "stat"]
    a, b = load_run(prof).set_index(key)["value"], load_run(tmp_path / "run").set_index(key)["value"]
    assert set(a.index) == set(b.index)
    assert ((a - b.reindex(a.index)).abs() <= 2e-5 * a.abs() + 1e-7).all()
    refused = runner.invoke(app, ["profile", str(run), "--out", str(tmp_path / "x"), "--stream", "--backend", "hf"])
    assert refused.exit_code == 2 and refused.output.startswith("error: streaming profiles natively loaded")
