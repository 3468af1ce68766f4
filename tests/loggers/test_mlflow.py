"""``--log-to mlflow`` and ``attach(..., log_to="mlflow")`` with a local file store: every metric's history,
read back with ``MlflowClient.get_metric_history``, holds at each recorded step (``step=``) the summary of
that step's parquet rows, exactly; the run's configs are its params; an active run is logged to."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import write_corpus
from typer.testing import CliRunner

mlflow = pytest.importorskip("mlflow")

from logger_readback import assert_same, expected_summaries, plain_loop, read_mlflow, train_args  # noqa: E402

from gpas_probe.cli.main import app  # noqa: E402
from gpas_probe.loggers import LogConfig  # noqa: E402


def test_attach_logs_the_summary_of_each_recorded_step(tmp_path: Path, mlflow_store: str) -> None:
    frame = plain_loop(tmp_path / "run", "mlflow")
    got, run = read_mlflow(mlflow_store)
    assert_same(got, expected_summaries(frame))
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["probe_config.outlier_factor"] == "10.0" and run.data.params["run_id"] == "run"
    assert mlflow.active_run() is None


def test_an_explicit_tracking_uri_and_an_active_run(tmp_path: Path, mlflow_store: str) -> None:
    elsewhere = f"file:{tmp_path / 'elsewhere'}"
    frame = plain_loop(tmp_path / "a", LogConfig(to=("mlflow",), mlflow_uri=elsewhere, project="exp"))
    got, run = read_mlflow(elsewhere)
    assert_same(got, expected_summaries(frame))
    assert mlflow.MlflowClient(elsewhere).get_experiment(run.info.experiment_id).name == "exp"

    with mlflow.start_run(run_name="mine") as mine:
        mlflow.log_metric("my/loss", 1.0, step=1)
        frame = plain_loop(tmp_path / "b", "mlflow")
        assert mlflow.active_run().info.run_id == mine.info.run_id  # left open
    got, run = read_mlflow(mlflow_store)
    assert run.info.run_id == mine.info.run_id
    assert got[1].pop("my/loss") == 1.0
    assert_same(got, expected_summaries(frame))


def test_train_command_logs_to_the_tracking_server(tmp_path: Path, mlflow_store: str) -> None:
    data = write_corpus(tmp_path, seed=0, words=2000)
    res = CliRunner().invoke(app, train_args(tmp_path / "run", data, "--log-to", "mlflow"))
    assert res.exit_code == 0, res.output
    from gpas_probe.store import load_run

    want = expected_summaries(load_run(tmp_path / "run"))
    assert sorted(want) == [1, 2, 4] and "gpas/model/val_loss" in want[4]
    got, run = read_mlflow(mlflow_store)
    assert_same(got, want)
    assert run.data.params["model_config.num_layers"] == "4" and run.data.params["train_config.steps"] == "4"


def test_a_tracking_store_mlflow_cannot_use_is_one_error_line(tmp_path: Path) -> None:
    data = write_corpus(tmp_path, seed=0, words=500)
    res = CliRunner().invoke(app, train_args(tmp_path / "run", data, "--log-to", "mlflow"),
                             env={"MLFLOW_TRACKING_URI": "bogus://nowhere"})
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: MLflow cannot log to 'bogus://nowhere': "), lines
    assert not (tmp_path / "run").exists()  # the new run that could not start leaves no folder
