"""Automatic resume checkpoints (``gpas_probe.autosave``): how often (at least ``autosave`` seconds apart and
20 save-durations apart), which are kept (one at a time; none once the run ends), and that a run with the
default settings killed mid-way resumes from one (it used to start over from step 0)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import write_corpus

import gpas_probe.autosave as autosave_mod
from gpas_probe import ModelConfig, TrainConfig, train
from gpas_probe.autosave import MARK, Autosave, is_autosave
from gpas_probe.checkpoints import load, step_checkpoints
from gpas_probe.distributed import DistContext


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("data"), seed=6, words=3000)


def test_the_interval_is_the_longer_of_the_setting_and_twenty_saves(monkeypatch) -> None:
    now = [100.0]
    monkeypatch.setattr(autosave_mod.time, "monotonic", lambda: now[0])
    a = Autosave(60.0, DistContext())
    now[0] += 59.9
    assert not a.due(1)
    now[0] += 0.2
    assert a.due(2)
    a.saved(started=now[0] - 5.0)  # a save that took 5 s: the next one no sooner than 100 s later
    assert a.interval == 100.0
    now[0] += 99.0
    assert not a.due(3)
    now[0] += 1.5
    assert a.due(4)
    assert not Autosave(0.0, DistContext()).due(5)  # 0 = off


def test_one_automatic_checkpoint_at_a_time_and_none_at_the_end(tmp_path: Path, text: Path, monkeypatch) -> None:
    monkeypatch.setattr(autosave_mod, "COST_FACTOR", 0)  # every step is due: autosave=1e-9 s
    seen: list[list[str]] = []

    def look(info) -> None:
        seen.append([p.name + ("*" if is_autosave(p) else "") for p in step_checkpoints(tmp_path / "run")])

    config = TrainConfig(steps=8, warmup=2, batch_size=4, seq_len=16, eval_every=0, eval_batches=1, data=str(text),
                         device="cpu", checkpoint_every=3, autosave=1e-9)
    train(ModelConfig.from_preset("tiny"), config, tmp_path / "run", callback=look)
    # the callback sees the checkpoints before the step's own save: after step s, the save of step s - 1
    assert seen[2] == ["step_000002*"]
    assert seen[3] == ["step_000003"]  # kept (checkpoint_every), and the automatic one before it is gone
    assert seen[5] == ["step_000003", "step_000005*"]
    assert [p.name for p in step_checkpoints(tmp_path / "run")] == ["step_000003", "step_000006", "step_000008"]
    assert not any((p / MARK).exists() for p in step_checkpoints(tmp_path / "run"))


CLI = ("import torch; torch.set_num_threads(1); import sys; from gpas_probe.cli.main import app; "
       "app(sys.argv[1:], prog_name='gpas-probe')")


def test_a_killed_run_with_default_checkpoints_resumes_from_an_automatic_one(tmp_path: Path, text: Path) -> None:
    def args(out: Path) -> list[str]:
        return ["train", "--preset", "tiny", "--steps", "400", "--seq-len", "16", "--batch-size", "4", "--probe-every",
                "20", "--autosave", "0.3", "--data", str(text), "--device", "cpu", "--out", str(out)]

    done = subprocess.run([sys.executable, "-c", CLI, *args(tmp_path / "reference")], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", CLI, *args(run)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not step_checkpoints(run) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(0.1)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = step_checkpoints(run)
    step = load(saved[0]).step
    assert len(saved) == 1 and is_autosave(saved[0]) and 0 < step < 400
    resumed = subprocess.run([sys.executable, "-c", CLI, *args(run), "--resume"], capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"from its checkpoint of step {step}" in resumed.stdout
    assert [p.name for p in step_checkpoints(run)] == ["step_000400"]
    want, got = load(tmp_path / "reference").model.state_dict(), load(run).model.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)
