"""``--log-to wandb`` and ``attach(..., log_to="wandb")`` in W&B's offline mode: the run's ``.wandb`` file,
read back record by record, holds at each recorded step (``gpas/step``) the summary of that step's parquet
rows, exactly, and the ``define_metric`` that plots every ``gpas/`` metric against ``gpas/step``."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import write_corpus
from typer.testing import CliRunner

wandb = pytest.importorskip("wandb")

from logger_readback import assert_same, expected_summaries, plain_loop, read_wandb, train_args  # noqa: E402

from gpas_probe.cli.main import app  # noqa: E402


def _logged(history: list[dict[str, object]]) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    for row in history:
        if "gpas/step" in row:
            step = int(row["gpas/step"])  # type: ignore[call-overload]
            assert step not in out, f"step {step} logged twice"
            out[step] = {k: v for k, v in row.items() if k.startswith("gpas/") and k != "gpas/step"}  # type: ignore[misc]
    return out


def _step_metric(metrics: list[object]) -> dict[str, str]:
    return {m.glob_name or m.name: m.step_metric for m in metrics}  # type: ignore[attr-defined]


def test_attach_logs_the_summary_of_each_recorded_step(tmp_path: Path, offline_wandb: Path) -> None:
    frame = plain_loop(tmp_path / "run", "wandb")
    assert wandb.run is None  # the run it started is finished when the probe closes
    history, metrics, folder = read_wandb(tmp_path / "run" / "wandb")
    assert_same(_logged(history), expected_summaries(frame))
    assert _step_metric(metrics).get("gpas/*") == "gpas/step"
    assert folder.parent == tmp_path / "run" / "wandb"  # run/wandb/offline-run-.../run-ID.wandb


def test_an_active_run_is_logged_to_and_left_open(tmp_path: Path, offline_wandb: Path) -> None:
    run = wandb.init(project="mine", dir=str(tmp_path))
    run.log({"my/loss": 1.0})
    frame = plain_loop(tmp_path / "run", "wandb")
    assert wandb.run is run
    run.log({"my/loss": 0.5})
    run.finish()
    history, _, _ = read_wandb(tmp_path / "wandb")
    assert_same(_logged(history), expected_summaries(frame))
    assert [row["my/loss"] for row in history if "my/loss" in row] == [1.0, 0.5]
    assert not (tmp_path / "run" / "wandb").exists()


def test_train_command_logs_an_offline_run(tmp_path: Path, offline_wandb: Path) -> None:
    data = write_corpus(tmp_path, seed=0, words=2000)
    res = CliRunner().invoke(app, train_args(tmp_path / "run", data, "--log-to", "wandb"))
    assert res.exit_code == 0, res.output
    from gpas_probe.store import load_run

    want = expected_summaries(load_run(tmp_path / "run"))
    assert sorted(want) == [1, 2, 4]
    history, metrics, _ = read_wandb(tmp_path / "run" / "wandb")
    assert_same(_logged(history), want)
    assert _step_metric(metrics).get("gpas/*") == "gpas/step"
