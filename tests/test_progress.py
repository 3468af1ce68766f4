"""Progress for a person watching (``gpas_probe.progress``): a bar in a terminal or a notebook, a plain line
every ``every_s`` seconds and at the end where output is a file (nohup, CI); ``train()`` shows it."""

from __future__ import annotations

import io
import logging

import pytest
from rich.console import Console

import gpas_probe.progress as progress_mod
from gpas_probe import ModelConfig, TrainConfig, train
from gpas_probe.progress import PhaseReport, ProgressReport
from gpas_probe.training import StepInfo


@pytest.fixture
def progress_log(caplog, monkeypatch):
    """caplog on the progress logger itself: the CLI's set-up (run by other tests in this process) stops
    that logger from propagating to the root logger where caplog listens."""
    logger = logging.getLogger("gpas_probe.progress")
    monkeypatch.setattr(logger, "propagate", False)
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)


def _info(step: int) -> StepInfo:
    return StepInfo(step=step, loss=2.5, lr=1e-3, grad_norm=1.0, tokens=step * 64, tokens_per_s=1234.0,
                    val_loss=2.25 if step == 10 else None)


def test_auto_is_a_bar_in_a_terminal_and_lines_in_a_file() -> None:
    assert ProgressReport("x", 10, console=Console(file=io.StringIO(), force_terminal=True)).mode == "bar"
    assert ProgressReport("x", 10, console=Console(file=io.StringIO(), force_jupyter=True)).mode == "bar"
    assert ProgressReport("x", 10, console=Console(file=io.StringIO(), force_terminal=False)).mode == "lines"
    with pytest.raises(ValueError, match="unknown progress mode 'loud'"):
        ProgressReport("x", 10, mode="loud")


def test_lines_come_every_interval_and_at_the_last_step(monkeypatch, progress_log) -> None:
    caplog = progress_log
    now = [0.0]
    monkeypatch.setattr(progress_mod.time, "monotonic", lambda: now[0])
    report = ProgressReport("pre+gpas", 10, start=2, mode="lines", every_s=30.0)
    with caplog.at_level(logging.INFO, logger="gpas_probe.progress"):
        for step in range(3, 11):
            now[0] += 10.0
            report(_info(step))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3  # at 30 s, 60 s and the last step (80 s)
    assert lines[0] == ("pre+gpas: step 5/10 (50%), loss 2.5000, 1,234 tok/s, elapsed 0:00:30, eta 0:00:50")
    assert lines[-1].startswith("pre+gpas: step 10/10 (100%), loss 2.5000, val 2.2500,")


def test_a_bar_draws_in_a_terminal() -> None:
    out = io.StringIO()
    report = ProgressReport("pre", 4, console=Console(file=out, force_terminal=True, width=120))
    for step in range(1, 5):
        report(_info(step))
    report.close()
    assert "pre" in out.getvalue() and "4/4" in out.getvalue()


def test_train_reports_progress_through_logging_when_not_a_terminal(progress_log) -> None:
    caplog = progress_log
    config = TrainConfig(steps=3, warmup=1, batch_size=2, seq_len=16, eval_every=0, eval_batches=1, device="cpu")
    with caplog.at_level(logging.INFO, logger="gpas_probe.progress"):
        train(ModelConfig.from_preset("tiny"), config, label="mine")
    assert any(r.getMessage().startswith("mine: step 3/3 (100%)") for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="gpas_probe.progress"):
        train(ModelConfig.from_preset("tiny"), config, progress="off")
    assert not caplog.records


def test_the_command_line_prints_progress_lines_when_output_is_not_a_terminal(tmp_path) -> None:
    from typer.testing import CliRunner

    from gpas_probe.cli.main import app

    res = CliRunner().invoke(app, ["train", "--preset", "tiny", "--steps", "3", "--seq-len", "16", "--device", "cpu",
                                   "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    assert "pre: step 3/3 (100%), loss " in res.output  # what nohup or a CI log now shows


def test_phase_report_is_quiet_for_the_first_second_then_lines_every_interval(progress_log) -> None:
    report = PhaseReport("profile", mode="lines", every_s=10.0, quiet_s=1.0, timer=False)
    t0 = report._t0
    report.update("reading the evaluation data", 0, 0)
    report.poll(t0 + 0.5)
    assert not progress_log.records  # an error in the first second prints alone
    report.update("loading ckpt", 0, 8)
    report.poll(t0 + 1.0)  # a long load: the line comes while nothing else happens
    report.poll(t0 + 5.0)
    report.update("run step 3", 2, 8)
    report.poll(t0 + 11.0)
    lines = [r.getMessage() for r in progress_log.records]
    assert lines == ["profile: loading ckpt, batch 0/8 (0%), elapsed 0:00:01",
                     "profile: run step 3, batch 2/8 (25%), elapsed 0:00:11, eta 0:00:33"]
    report.finish("1 run(s) into out")
    assert progress_log.records[-1].getMessage().startswith("profile: 1 run(s) into out, batch 2/8 (25%)")


def test_profile_shows_progress_lines_when_output_is_not_a_terminal(tiny_gpas_run, tmp_path) -> None:
    """The command line with stderr going to a file: plain lines, and a last one when done."""
    import subprocess
    import sys

    err = tmp_path / "err.txt"
    with err.open("w") as f:
        proc = subprocess.run([sys.executable, "-m", "gpas_probe.cli.main", "profile", str(tiny_gpas_run), "--out",
                               str(tmp_path / "p"), "--batches", "2", "--batch-size", "2", "--seq-len", "32"],
                              stdout=subprocess.PIPE, stderr=f, text=True, timeout=300)
    assert proc.returncode == 0, err.read_text()
    lines = err.read_text().splitlines()
    assert lines and lines[-1].startswith("profile: 1 run(s) into ")
    assert "batch 4/4 (100%)" in lines[-1]  # 2 checkpoints, 2 batches each
    assert all(line.startswith("profile: ") for line in lines), lines
