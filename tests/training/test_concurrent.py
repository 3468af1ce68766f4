"""Two writers, one folder: a second ``train`` (or ``attach``, or a resume) on a folder a running ``train``
writes fails at once with one line naming the first's PID, and the first loses nothing. Readers of the live
run (``info``, ``plot``, ``compare``) show what is there and say it is still running."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import write_corpus
from run_checks import check_every_file_reads
from typer.testing import CliRunner

from gpas_probe import attach
from gpas_probe.cli.main import app
from gpas_probe.config import ModelConfig
from gpas_probe.lock import FolderInUse, holder
from gpas_probe.model import build_model
from gpas_probe.probes import load_run
from gpas_probe.store import KEY_COLUMNS

runner = CliRunner()
STEPS = 1500


def _cli(args: list[str]) -> list[str]:
    return [sys.executable, "-c", "import torch; torch.set_num_threads(1); from gpas_probe.cli.main import app; "
            "import sys; app(sys.argv[1:], prog_name='gpas-probe')", *args]


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("data"), seed=4, words=4000)


def test_a_second_writer_fails_at_once_and_the_first_loses_nothing(tmp_path: Path, text: Path) -> None:
    run = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--steps", str(STEPS), "--seq-len", "16", "--batch-size", "4", "--probe-every",
            "50", "--checkpoint-every", "500", "--data", str(text), "--device", "cpu", "--out", str(run)]
    first = subprocess.Popen(_cli(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while holder(run) is None or not (run / "probes").is_dir():
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.05)

        for extra in (["--overwrite", "--seed", "1"], ["--resume"]):
            second = subprocess.run(_cli([*args, *extra]), capture_output=True, text=True, timeout=120)
            lines = [line for line in second.stderr.splitlines() if line.strip()]
            assert second.returncode == 2 and len(lines) == 1, second.stderr
            assert lines[0].startswith(f"error: {run} is being written by another gpas-probe process (pid {first.pid}, "
                                       "train, since ")
            assert first.poll() is None  # the second failed while the first ran on

        with pytest.raises(FolderInUse, match=f"pid {first.pid}"):
            attach(build_model(ModelConfig.from_preset("tiny")), run, if_exists="append")

        # the live run reads: what is there, and that it is still running
        info = runner.invoke(app, ["info", str(run)])
        assert info.exit_code == 0 and f"status: running (pid {first.pid}, train" in info.output, info.output
        deadline = time.monotonic() + 120
        while not list((run / "probes").glob("part-*.parquet")):  # rows reach disk within 30 s
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        plot = runner.invoke(app, ["plot", "loss", str(run), "-o", str(tmp_path / "loss.png")])
        assert plot.exit_code == 0 and "is still running" in plot.output and (tmp_path / "loss.png").exists()
    finally:
        out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    assert check_every_file_reads(run) == STEPS
    frame = load_run(run, dedupe=False)
    assert not frame.duplicated(KEY_COLUMNS).any() and sorted(frame.step.unique()) == list(range(1, STEPS + 1))
    assert sorted(frame[frame.layer >= 0].step.unique()) == [1, *range(50, STEPS + 1, 50)]
    assert json.loads((run / "run.json").read_text())["train_config"]["seed"] == 0  # the first's, untouched
    assert holder(run) is None
    done = runner.invoke(app, ["info", str(run)])
    assert f"status: finished at step {STEPS}" in done.output


def test_a_live_run_without_rows_yet_says_so(tmp_path: Path) -> None:
    from gpas_probe.lock import RunLock

    run = tmp_path / "run"
    (run / "probes").mkdir(parents=True)
    (run / "probes" / "_meta.json").write_text("{}")
    with RunLock(run, "train") as lock:
        lock.announce()
        for args in (["plot", "loss", str(run), "-o", str(tmp_path / "x.png")], ["compare", str(run)]):
            res = runner.invoke(app, args)
            assert res.exit_code == 2 and res.output.startswith(f"error: {run}: no probe rows yet; the run is still "
                                                                "running (pid "), res.output
    res = runner.invoke(app, ["compare", str(run)])
    assert res.exit_code == 2 and "the run recorded none (probes off?) or stopped before writing any" in res.output
