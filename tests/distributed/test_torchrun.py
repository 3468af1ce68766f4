"""``gpas-probe train --dist ddp|fsdp`` under torchrun (2 processes, gloo, CPU) against one process
training on the same global batch: every probe row and the final weights agree to float rounding."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
from helpers import write_corpus
from safetensors.torch import load_file, save_file

from gpas_probe import ModelConfig, TrainConfig, train
from gpas_probe.checkpoints import load
from gpas_probe.probes import ProbeConfig, load_run
from gpas_probe.store import KEY_COLUMNS

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

WORLD, PER_RANK = 2, 2
STEPS = 6


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("data"), seed=0, words=6000)


def _cli_args(norm: str, gate: str, data: Path, out: Path, steps: int = STEPS, batch: int = PER_RANK) -> list[str]:
    return ["--preset", "tiny", "--norm", norm, "--gpas", "--gate", gate, "--steps", str(steps), "--warmup", "2",
            "--batch-size", str(batch), "--seq-len", "16", "--clip-gate-grad", "0.002", "--eval-every", "2",
            "--checkpoint-every", "3", "--probe-every", "1", "--data", str(data), "--device", "cpu", "--out", str(out)]


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
           "-m", "gpas_probe.cli.main", "train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=240)


def _ok(res: subprocess.CompletedProcess) -> None:
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-6000:]


def _reference(norm: str, gate: str, data: Path, out: Path) -> torch.nn.Module:
    """One process, batch WORLD * PER_RANK: the same global batch the ranks share."""
    model = ModelConfig.from_preset("tiny", norm=norm, gpas=True, gpas_granularity=gate)
    tc = TrainConfig(steps=STEPS, warmup=2, lr=3e-3, batch_size=WORLD * PER_RANK, seq_len=16, gate_clip=0.002,
                     eval_every=2, eval_batches=1, checkpoint_every=3, data=str(data), device="cpu")
    return train(model, tc, out, probe=ProbeConfig(every=1)).model


#: Where the largest activation sits: under torchrun, rank 0's coordinates (documented), so not the
#: single process's over the global batch.
RANK0_STATS = ("absmax_dim", "absmax_pos", "absmax_token")


def _assert_same_table(got: pd.DataFrame, ref: pd.DataFrame) -> None:
    assert not got.duplicated(KEY_COLUMNS).any() and not ref.duplicated(KEY_COLUMNS).any()
    where = got[got.stat.isin(RANK0_STATS)]
    assert len(where) and (where.value >= 0).all() and (where.value == where.value.round()).all()
    got, ref = got[~got.stat.isin(RANK0_STATS)], ref[~ref.stat.isin(RANK0_STATS)]
    merged = ref.merge(got, on=KEY_COLUMNS, how="outer", suffixes=("_ref", "_got"), indicator=True)
    assert (merged["_merge"] == "both").all(), merged[merged["_merge"] != "both"].head()
    assert sorted(merged.step.unique()) == list(range(1, STEPS + 1))
    # tolerance: relative, plus 1e-5 of the statistic's own scale (cosines and gates cross zero)
    scale = merged.groupby(["site", "direction", "stat"]).value_ref.transform(lambda v: v.abs().max())
    a, b = merged.value_got.to_numpy(), merged.value_ref.to_numpy()
    ok = (np.abs(a - b) <= 1e-4 * np.abs(b) + 1e-5 * scale.to_numpy()) | (np.isnan(a) & np.isnan(b))
    bad = merged.loc[~ok, [*KEY_COLUMNS, "value_ref", "value_got"]]
    assert bad.empty, bad.head(10).to_string()
    stats = set(merged.stat)
    assert {"var", "rms", "absmax", "shortcut_branch_ratio", "grad_norm", "update_ratio", "alpha_grad", "loss",
            "val_loss", "tokens"} <= stats


def _assert_same_weights(run: Path, ref: torch.nn.Module) -> None:
    loaded = load(run)  # a checkpoint written by rank 0 loads in one process
    model = loaded.model
    assert loaded.step == STEPS
    want = ref.state_dict()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, want[k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.parametrize("mode, norm, gate", [("ddp", "pre", "layer"), ("fsdp", "sandwich", "layer")])
def test_torchrun_matches_one_process_on_the_global_batch(tmp_path: Path, text: Path, mode: str, norm: str,
                                                          gate: str) -> None:
    ref_model = _reference(norm, gate, text, tmp_path / "ref")
    ref = load_run(tmp_path / "ref", dedupe=False)

    run = tmp_path / mode
    res = _torchrun([*_cli_args(norm, gate, text, run), "--dist", mode], tmp_path)
    _ok(res)
    assert res.stdout.count("trained") == 1  # rank 0 alone reports
    assert json.loads((run / "run.json").read_text())["world_size"] == WORLD
    _assert_same_table(load_run(run, dedupe=False), ref)
    _assert_same_weights(run, ref_model)
    if mode == "ddp":
        _non_finite_under_torchrun(run, norm, gate, text, tmp_path)
        return

    # FSDP resume: lose the last checkpoint, resume from step 3 (sharded optimizer state reloaded),
    # and the run again matches one process, with each step's rows once.
    shutil.rmtree(run / "checkpoints" / f"step_{STEPS:06d}")
    _ok(_torchrun([*_cli_args(norm, gate, text, run), "--dist", mode, "--resume"], tmp_path))
    _assert_same_table(load_run(run, dedupe=False), ref)
    _assert_same_weights(run, ref_model)


def _non_finite_under_torchrun(run: Path, norm: str, gate: str, text: Path, cwd: Path) -> None:
    """An inf weight in the last checkpoint: both ranks stop at the next step with the same error,
    which rank 0 alone prints, after the probes recorded the step."""
    weights = run / "checkpoints" / f"step_{STEPS:06d}" / "model.safetensors"
    state = load_file(weights)
    state["model.layers.2.mlp.down_proj.weight"][0, 0] = math.inf
    save_file(state, weights, metadata={"format": "pt"})
    res = _torchrun([*_cli_args(norm, gate, text, run, steps=STEPS + 1), "--dist", "ddp", "--resume"], cwd)
    assert res.returncode != 0
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: non-finite loss (nan) at step {STEPS + 1}; first non-finite value at layer 2, "
                      "site mlp_out (activation)"], res.stderr[-3000:]
    assert "[rank0]: Traceback" not in res.stderr and "[rank1]: Traceback" not in res.stderr
    # the first rank to stop leaves with the user-error code (torchrun then stops the other)
    assert "exitcode  : 2" in res.stderr and "terminate called" not in res.stderr
    assert load_run(run).step.max() == STEPS + 1


def test_ranks_slice_one_global_validation_batch(text: Path) -> None:
    from gpas_probe.data import Batches, load_corpus

    corpus = load_corpus(text)
    whole = Batches(corpus, WORLD * PER_RANK, 16).val(3)
    per_rank = [Batches(corpus, PER_RANK, 16).val(3, rank, WORLD) for rank in range(WORLD)]
    for i, (x, y) in enumerate(whole):
        assert torch.equal(x, torch.cat([r[i][0] for r in per_rank]))
        assert torch.equal(y, torch.cat([r[i][1] for r in per_rank]))
