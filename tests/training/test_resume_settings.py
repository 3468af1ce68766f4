"""``--resume`` continues a run with its own settings: options not given are the run's (model, training,
probes); options given are compared only when they change the arithmetic (refused), and take effect
otherwise (steps, evaluation, checkpoints, device, probes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import write_corpus
from typer.testing import CliRunner

from gpas_probe.cli.main import app
from gpas_probe.launch import TrainOptions
from gpas_probe.probes import load_run

runner = CliRunner()


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("data"), seed=3, words=3000)


def _started(tmp_path: Path, text: Path) -> Path:
    run = tmp_path / "run"
    res = runner.invoke(app, ["train", "--preset", "tiny", "--norm", "mixln", "--post-layers", "1", "--gpas",
                              "--gate", "sublayer", "--steps", "4", "--lr", "0.002", "--seq-len", "16",
                              "--probe-every", "2", "--checkpoint-every", "2", "--data", str(text), "--device", "cpu",
                              "--out", str(run)])
    assert res.exit_code == 0, res.output
    return run


def test_the_readme_resume_takes_the_runs_own_settings(tmp_path: Path, text: Path) -> None:
    run = _started(tmp_path, text)
    res = runner.invoke(app, ["train", "--out", str(run), "--steps", "6", "--resume"])
    assert res.exit_code == 0, res.output
    assert "resumed" in res.output and "from its checkpoint of step 4, to step 6" in res.output
    meta = json.loads((run / "run.json").read_text())
    assert meta["model_config"]["norm"] == "mixln" and meta["model_config"]["gpas_granularity"] == "sublayer"
    assert (meta["train_config"]["steps"], meta["train_config"]["lr"], meta["train_config"]["data"]) == (
        6, 0.002, str(text))
    frame = load_run(run)
    assert sorted(frame[frame.layer >= 0].step.unique()) == [1, 2, 4, 6]  # the run's probe schedule: every 2


def test_options_that_do_not_change_the_arithmetic_may_change(tmp_path: Path, text: Path) -> None:
    run = _started(tmp_path, text)
    res = runner.invoke(app, ["train", "--out", str(run), "--steps", "6", "--checkpoint-every", "3",
                              "--eval-every", "1", "--probe-every", "3", "--resume"])
    assert res.exit_code == 0, res.output
    meta = json.loads((run / "run.json").read_text())
    assert (meta["train_config"]["checkpoint_every"], meta["train_config"]["eval_every"]) == (3, 1)
    assert meta["probe_config"]["every"] == 3
    frame = load_run(run)
    assert sorted(frame[frame.layer >= 0].step.unique()) == [1, 2, 4, 6]  # 1, 2 from before; then every 3
    assert sorted(frame[frame.stat == "val_loss"].step.unique()) == [4, 5, 6]


@pytest.mark.parametrize("args, message", [
    (["--norm", "pre"], "a model that differs from the run's: norm (run: 'mixln', now: 'pre')"),
    (["--gate", "layer"], "gpas_granularity (run: 'sublayer', now: 'layer')"),
    (["--lr", "0.01"], "training settings that differ from the run's: lr (run: 0.002, now: 0.01)"),
    (["--seed", "5"], "seed (run: 0, now: 5)"),
    (["--preset", "small"], "a model that differs from the run's:"),
])
def test_arithmetic_options_given_that_differ_are_refused(tmp_path: Path, text: Path, args: list[str],
                                                          message: str) -> None:
    run = _started(tmp_path, text)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    res = runner.invoke(app, ["train", "--out", str(run), "--steps", "6", *args, "--resume"])
    assert res.exit_code == 2 and message in res.output, res.output
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_options_given_that_match_the_run_are_accepted(tmp_path: Path, text: Path) -> None:
    run = _started(tmp_path, text)
    given = {"norm", "gpas", "gate", "lr", "steps"}
    options = TrainOptions(preset="tiny", norm="mixln", gpas=True, gate="sublayer", out=run,
                           train={"lr": 0.002, "steps": 8})
    model, train, _, out = options.for_resume(given)
    assert out == run and train.steps == 8 and model.post_layers == 1  # post layers: the run's
