"""`gpas-probe train` end to end, packaging, and preset sizes."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from gpas_probe import NormScheme
from gpas_probe.checkpoints import load
from gpas_probe.cli.main import app

runner = CliRunner()


@pytest.mark.parametrize("gpas", [False, True], ids=["base", "gpas"])
@pytest.mark.parametrize("norm", [s.value for s in NormScheme])
def test_train_every_scheme(tmp_path, norm, gpas):
    out = tmp_path / "run"
    args = ["train", "--preset", "small", "--norm", norm, "--steps", "20", "--batch-size", "2",
            "--seq-len", "32", "--eval-every", "10", "--out", str(out)] + (["--gpas"] if gpas else [])
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "validation loss" in res.output
    loaded = load(out)
    model = loaded.model
    assert loaded.step == 20
    assert model.config.norm.value == norm and model.config.gpas is gpas
    assert model.config.num_layers == 24
    meta = json.loads((out / "run.json").read_text())
    assert meta["train_config"]["steps"] == 20
    logits = model(torch.randint(0, 256, (1, 8))).logits
    assert torch.isfinite(logits).all()


def test_train_refuses_existing_run_without_flag(tmp_path):
    out = tmp_path / "run"
    base = ["train", "--preset", "tiny", "--steps", "2", "--out", str(out)]
    assert runner.invoke(app, base).exit_code == 0
    res = runner.invoke(app, base)
    assert res.exit_code != 0
    assert "already holds a run" in res.output and "Traceback" not in res.output
    assert runner.invoke(app, base + ["--overwrite"]).exit_code == 0
    res = runner.invoke(app, ["train", "--preset", "tiny", "--steps", "4", "--out", str(out), "--resume"])
    assert res.exit_code == 0, res.output
    assert load(out).step == 4


@pytest.mark.parametrize("args, message", [
    (["--preset", "nope"], "unknown preset"),
    (["--preset", "tiny", "--data", "/no/such/file.txt"], "not found"),
    (["--preset", "tiny", "--steps", "0"], "steps must be positive"),
])
def test_train_bad_input_is_one_line(tmp_path, args, message):
    res = runner.invoke(app, ["train", *args, "--out", str(tmp_path / "r")])
    assert res.exit_code == 2
    assert message in res.output and "Traceback" not in res.output


def test_help_lists_commands():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0 and "train" in res.output
    assert runner.invoke(app, ["train", "--help"]).exit_code == 0


def test_console_script_and_no_top_level_cli(tmp_path):
    # The console script is installed and `cli` is only importable as gpas_probe.cli.
    out = subprocess.run([sys.executable, "-m", "gpas_probe.cli.main", "--version"], capture_output=True, text=True,
                         cwd=tmp_path)
    assert out.returncode == 0 and "gpas-probe" in out.stdout
    probe = subprocess.run([sys.executable, "-c", "import importlib.util as u; print(u.find_spec('cli'))"],
                           capture_output=True, text=True, cwd=tmp_path)
    assert probe.stdout.strip() == "None"
    assert importlib.util.find_spec("gpas_probe.cli") is not None
