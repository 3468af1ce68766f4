"""Fault injection: ``train`` is stopped at random moments, 24 times (SIGKILL and SIGINT alternating), and
resumed each time. After every stop: every file reads, and no more than one checkpoint interval of work is
lost. After every resume to the end: each (step, layer, site, direction, stat) appears once, every row
equals the uninterrupted run's, and so do the final weights, bit for bit.

The signal comes from a timer armed right after a random step's progress report, a random fraction of a
step later: it lands in that step's checkpoint (written after the report) or anywhere in the next step
(forward, backward, optimizer, probe rows, a checkpoint being written). A run stopped before its first
checkpoint cannot be resumed (one line says so) and is started again with --overwrite.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers import write_corpus
from run_checks import assert_one_row_per_key, check_every_file_reads, temporaries

from gpas_probe.checkpoints import load
from gpas_probe.probes import load_run
from gpas_probe.store import KEY_COLUMNS

STEPS, EVERY, RUNS = 24, 4, 24

#: The CLI on one thread; with a signal name, a step and a delay, it signals itself that long after the
#: step's progress report (the report is the first thing after the step's optimizer update and rows).
CLI = """
import os, signal, sys, threading
import torch
torch.set_num_threads(1)
import gpas_probe.progress as progress
from gpas_probe.cli.main import app
name, at, delay = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
report = progress.ProgressReport.__call__
def call(self, info):
    report(self, info)
    if name != "none" and info.step == at:
        threading.Timer(delay, os.kill, (os.getpid(), getattr(signal, name))).start()
progress.ProgressReport.__call__ = call
app(sys.argv[4:], prog_name="gpas-probe")
"""


def _run(args: list[str], sig: str = "none", at: int = 0, delay: float = 0.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CLI, sig, str(at), str(delay), *args], capture_output=True,
                          text=True, timeout=180)


def _args(out: Path, text: Path) -> list[str]:
    return ["train", "--preset", "tiny", "--gpas", "--steps", str(STEPS), "--seq-len", "16", "--batch-size", "4",
            "--checkpoint-every", str(EVERY), "--autosave", "0", "--probe-every", "1", "--eval-every", "6",
            "--data", str(text), "--device", "cpu", "--out", str(out)]


def _state(run: Path) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in load(run).model.state_dict().items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, pd.Series, dict[str, torch.Tensor]]:
    root = tmp_path_factory.mktemp("faults")
    text = write_corpus(root, seed=2, words=4000)
    res = _run(_args(root / "reference", text))
    assert res.returncode == 0, res.stderr[-2000:]
    rows = load_run(root / "reference", dedupe=False).set_index(KEY_COLUMNS).value.sort_index()
    return text, rows, _state(root / "reference")


@pytest.mark.parametrize("i", range(RUNS))
def test_a_run_stopped_at_a_random_moment_resumes_to_the_uninterrupted_result(i: int, tmp_path: Path,
                                                                              reference) -> None:
    text, want_rows, want_state = reference
    rng = random.Random(i)
    sig = "SIGKILL" if i % 2 == 0 else "SIGINT"
    at, delay = rng.randrange(1, STEPS), rng.uniform(0.0, 0.05)
    out = tmp_path / "run"
    args = _args(out, text)

    stopped = _run(args, sig, at, delay)
    killed = stopped.returncode == -signal.SIGKILL
    assert killed or stopped.returncode in (0, 130), stopped.stderr[-2000:]  # SIGINT late: the run had ended
    if stopped.returncode == 130:  # Ctrl-C: stopped at a step boundary with a checkpoint, one line
        lines = [line for line in stopped.stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and "checkpoint and probe rows saved; continue with --resume" in lines[0]
    last = check_every_file_reads(out)
    # the signal fell after step at's report: in step at's own checkpoint (written after the report), in step
    # at + 1, or after the run ended. What is lost is at most one checkpoint interval: steps last + 1 .. at.
    assert at - last <= EVERY or stopped.returncode == 0, (at, last)
    if sig == "SIGINT" and stopped.returncode == 130:
        assert last >= at  # Ctrl-C loses nothing: the step it interrupted finished and was saved

    resumed = _run([*args, "--resume"])
    if last == 0:  # stopped before its first checkpoint: nothing to resume, and the run says so
        assert resumed.returncode == 2 and "nothing to resume from" in resumed.stderr, resumed.stderr[-2000:]
        resumed = _run([*args, "--overwrite"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    assert check_every_file_reads(out) == STEPS
    assert temporaries(out) == []
    frame = load_run(out, dedupe=False)
    assert_one_row_per_key(frame, STEPS)
    rows = frame.set_index(KEY_COLUMNS).value.sort_index()
    pd.testing.assert_index_equal(rows.index, want_rows.index)
    pd.testing.assert_series_equal(rows, want_rows)
    state = _state(out)
    assert state.keys() == want_state.keys()
    for k, v in want_state.items():
        assert torch.equal(state[k], v), k
