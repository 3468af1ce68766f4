"""The logger tests' set-up: offline W&B and a file-store MLflow, both inside the test's folder."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def offline_wandb(monkeypatch, tmp_path: Path) -> Iterator[Path]:
    """W&B in offline mode, its settings, cache and data in the test's folder; yields that folder."""
    wandb = pytest.importorskip("wandb")
    home = tmp_path / "wandb-home"
    for var, sub in (("WANDB_DIR", "dir"), ("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"),
                     ("WANDB_DATA_DIR", "data"), ("WANDB_ARTIFACT_DIR", "artifacts")):
        (home / sub).mkdir(parents=True)
        monkeypatch.setenv(var, str(home / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    yield home
    if wandb.run is not None:
        wandb.finish()


@pytest.fixture
def mlflow_store(monkeypatch, tmp_path: Path) -> Iterator[str]:
    """MLflow tracking into a local file store in the test's folder (MLflow 3 refuses a file store unless
    MLFLOW_ALLOW_FILE_STORE opts in; a database store needs the full mlflow package); yields its URI."""
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = f"file:{tmp_path / 'mlruns'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # set_tracking_uri sets it too: restored after the test
    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)  # MLflow's own default again
