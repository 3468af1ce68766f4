"""Under ``torchrun`` only rank 0 logs: ``train --dist ddp --log-to tensorboard,wandb,mlflow`` on 2 processes
leaves one TensorBoard event file, one offline W&B run and one MLflow run, each holding the summaries of the
table that rank 0 wrote."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist
from helpers import write_corpus

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")


def test_only_rank_0_logs(monkeypatch, tmp_path: Path) -> None:
    for package in ("tensorboard", "wandb", "mlflow"):
        pytest.importorskip(package)
    from logger_readback import (
        assert_same,
        expected_summaries,
        read_mlflow,
        read_tensorboard,
        read_wandb,
        train_args,
    )

    from gpas_probe.store import load_run

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses a file store without it
    data, out, uri = write_corpus(tmp_path, seed=0, words=3000), tmp_path / "run", f"file:{tmp_path / 'mlruns'}"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "MLFLOW_TRACKING_URI": uri,
           "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"), "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
           "WANDB_DATA_DIR": str(tmp_path / "wandb-data")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "gpas_probe.cli.main", *train_args(out, data, "--dist", "ddp", "--log-to", "tensorboard,wandb,mlflow")]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=400)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-6000:]

    want = expected_summaries(load_run(out))
    assert sorted(want) == [1, 2, 4]
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1
    got, _ = read_tensorboard(out / "tensorboard")
    assert_same(got, want, cast=lambda v: float(np.float32(v)))
    history, _, _ = read_wandb(out / "wandb")  # asserts a single run
    logged = {int(row["gpas/step"]): {k: v for k, v in row.items() if k.startswith("gpas/") and k != "gpas/step"}
              for row in history if "gpas/step" in row}
    assert_same(logged, want)
    got, _ = read_mlflow(uri)  # asserts a single run
    assert_same(got, want)
    assert not (tmp_path / "wandb").exists()  # no other rank started a W&B run in the working folder
