"""Crash safety and non-finite values: a run killed with SIGKILL at any moment leaves readable files,
``--resume`` continues it with one row per (step, layer, site, direction, stat), and a non-finite
loss stops training with a message that names where the first non-finite value appeared."""

from __future__ import annotations

import math
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers import write_corpus
from run_checks import assert_one_row_per_key, check_every_file_reads, temporaries
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import gpas_probe.training as train_mod
from gpas_probe import ModelConfig, TrainConfig, train
from gpas_probe.checkpoints import step_checkpoints
from gpas_probe.cli.main import app
from gpas_probe.probes import ProbeConfig, load_run
from gpas_probe.store import KEY_COLUMNS, ProbeWriter, read_meta, truncate_after

runner = CliRunner()


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("data"), seed=1, words=6000)


# -- SIGKILL ---------------------------------------------------------------------------------------
#: Runs the CLI (on one thread, as the in-process tests do: tiny models run fastest so, and do not
#: stall when other processes share the cores); with N > 0 it SIGKILLs itself just before its N-th
#: atomic rename (a whole temporary file or folder written, not yet in place): the most delicate
#: moments of a write, hit deterministically.
CLI = """
import os, signal, sys
import torch
from gpas_probe.cli.main import app
torch.set_num_threads(1)
n, real, count = int(sys.argv[1]), os.replace, [0]
def replace(src, dst):
    count[0] += 1
    if count[0] == n:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst)
os.replace = replace
app(sys.argv[2:], prog_name="gpas-probe")
"""


def _cli(args: list[str], kill_at_rename: int = 0) -> list[str]:
    return [sys.executable, "-c", CLI, str(kill_at_rename), *args]


def _kill_at_rename(n: int, args: list[str]) -> None:
    res = subprocess.run(_cli(args, n), capture_output=True, text=True, timeout=120)
    assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]


def _kill_after_checkpoint(target: int, args: list[str], delay: float) -> None:
    """SIGKILL a run ``delay`` seconds after its latest checkpoint reaches step ``target``."""
    out = Path(args[args.index("--out") + 1])
    proc = subprocess.Popen(_cli(args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        ckpts = step_checkpoints(out) if (out / "checkpoints").is_dir() else []
        if ckpts and int(ckpts[-1].name.split("_")[1]) >= target:
            break
        time.sleep(0.02)
    time.sleep(delay)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]  # still running: the kill is mid-run
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stderr.close()


def test_sigkill_mid_run_leaves_readable_files_and_resume_keeps_one_row_per_key(tmp_path: Path, text: Path) -> None:
    steps = 16
    out = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--gpas", "--steps", str(steps), "--seq-len", "16", "--checkpoint-every", "2",
            "--probe-every", "1", "--eval-every", "7", "--data", str(text), "--device", "cpu", "--out", str(out)]
    snapshots = []

    # renames of a new run: 1 run.json, 2 probes/_meta.json, then per 2 steps a chunk and a checkpoint;
    # killed before the 5th (the chunk of steps 3-4): a whole temporary chunk is left behind
    _kill_at_rename(5, args)
    assert check_every_file_reads(out) == 2
    assert [p.name for p in temporaries(out)] == [".part-000001.parquet.tmp"]
    snapshots.append(load_run(out))

    # resumed from step 2 (its 1st rename: run.json notes the resume) and killed before its 3rd (checkpoint
    # 4), after the chunk of steps 3-4 was published: the table holds rows the checkpoint does not cover,
    # and a temporary folder is left
    _kill_at_rename(3, [*args, "--resume"])
    assert check_every_file_reads(out) == 2
    assert sorted(load_run(out).step.unique()) == [1, 2, 3, 4]
    assert [p.name.split("-")[0] for p in temporaries(out)] == [".step_000004.tmp"]
    snapshots.append(load_run(out))

    # resumed (rows of steps 3-4 dropped and recorded again), then killed at an arbitrary moment
    _kill_after_checkpoint(8, [*args, "--resume"], delay=random.Random(0).uniform(0, 0.05))
    assert check_every_file_reads(out) >= 8
    snapshots.append(load_run(out))

    res = subprocess.run(_cli([*args, "--resume"]), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert check_every_file_reads(out) == steps
    assert temporaries(out) == []  # what the kills interrupted was cleared on resume
    frame = load_run(out, dedupe=False)
    assert_one_row_per_key(frame, steps)
    # resuming is exact, so every row recorded before a kill is the one the finished run holds
    final = frame.set_index(KEY_COLUMNS).value
    for before in snapshots:
        old = before.set_index(KEY_COLUMNS).value
        pd.testing.assert_series_equal(final.loc[old.index], old)


# -- resume drops what the stopped run recorded after its checkpoint ---------------------------------
def _cfg(text: Path, **kw) -> tuple[ModelConfig, TrainConfig]:
    tc = dict(steps=9, warmup=2, lr=3e-3, batch_size=4, seq_len=16, eval_every=4, eval_batches=1,
              checkpoint_every=3, data=str(text), device="cpu")
    return ModelConfig.from_preset("tiny", gpas=True), TrainConfig(**{**tc, **kw})


def test_resume_replaces_rows_recorded_after_the_checkpoint(tmp_path: Path, text: Path) -> None:
    m, t = _cfg(text)
    train(m, t, tmp_path / "full", probe=ProbeConfig(every=1))
    reference = load_run(tmp_path / "full", dedupe=False)

    # the run stopped after recording step 9 but before (or while) checkpoints 6 and 9 were written
    shutil.copytree(tmp_path / "full", tmp_path / "run")
    for step in (6, 9):
        shutil.rmtree(tmp_path / "run" / "checkpoints" / f"step_{step:06d}")
    (tmp_path / "run" / "checkpoints" / ".step_000006.tmp-x").mkdir()  # an interrupted checkpoint
    (tmp_path / "run" / "probes" / ".part-000009.parquet.tmp").write_bytes(b"half")  # an interrupted chunk
    resumed = train(m, t, tmp_path / "run", resume=True, probe=ProbeConfig(every=1))
    assert [h.step for h in resumed.history] == list(range(4, 10))
    frame = load_run(tmp_path / "run", dedupe=False)
    assert_one_row_per_key(frame, 9)
    frame["run_id"] = reference["run_id"].iloc[0]  # the copy lives in a folder of another name
    pd.testing.assert_frame_equal(frame.sort_values(KEY_COLUMNS).reset_index(drop=True),
                                  reference.sort_values(KEY_COLUMNS).reset_index(drop=True))
    assert temporaries(tmp_path / "run") == []

    # a resume with a sparser probe schedule: the old rows after step 3 go, they are not re-recorded
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step_000006")
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step_000009")
    train(m, t, tmp_path / "run", resume=True, probe=ProbeConfig(every=5))
    frame = load_run(tmp_path / "run", dedupe=False)
    assert not frame.duplicated(KEY_COLUMNS).any()
    assert sorted(frame.step.unique()) == list(range(1, 10))  # model rows (loss, lr...) on every step
    assert sorted(frame[frame.layer >= 0].step.unique()) == [1, 2, 3, 5]  # probed: 1-3 kept, then every 5
    assert set(frame[frame.step.isin([4, 8])].stat) >= {"loss", "val_loss"}


def test_resume_with_no_checkpoint_is_refused_and_changes_nothing(tmp_path: Path, text: Path) -> None:
    """A run killed before its first checkpoint: --resume stops with one line instead of starting over
    (which would drop every row recorded); --overwrite is the explicit restart."""
    m, t = _cfg(text, steps=4, checkpoint_every=0)
    run = tmp_path / "run"
    train(m, t, run, probe=ProbeConfig(every=1))
    shutil.rmtree(run / "checkpoints")  # killed before its first checkpoint
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(FileNotFoundError, match="nothing to resume from: the run stopped before its first checkpoint"):
        train(m, t, run, resume=True, probe=ProbeConfig(every=2))
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    result = train(m, t, run, overwrite=True, probe=ProbeConfig(every=2))
    assert [h.step for h in result.history] == [1, 2, 3, 4]
    frame = load_run(run, dedupe=False)
    assert not frame.duplicated(KEY_COLUMNS).any() and sorted(frame[frame.layer >= 0].step.unique()) == [1, 2, 4]


def test_truncate_after_rewrites_only_the_chunks_past_the_step(tmp_path: Path) -> None:
    d = tmp_path / "run" / "probes"
    w = ProbeWriter(d, "run", {"model_config": {"num_layers": 1}}, flush_steps=3)
    for step in range(1, 8):
        for stat, value in (("rms", step + 0.5), ("var", -step)):
            w.add(step, 0, "resid_pre", "fwd", stat, value)
        w.end_step()
    w.close()
    first = (d / "part-000000.parquet").read_bytes()
    assert [p.name for p in w.parts] == ["part-000000.parquet", "part-000001.parquet", "part-000002.parquet"]

    bad = d / "part-000003.parquet"
    bad.write_bytes(b"not parquet")
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    with pytest.raises(ValueError, match="part-000003.parquet: corrupted"):
        truncate_after(d, 4)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before  # refused before changing anything
    bad.unlink()

    assert [p.name for p in truncate_after(d, 4)] == ["part-000001.parquet", "part-000002.parquet"]
    assert [p.name for p in w.parts] == ["part-000000.parquet", "part-000001.parquet"]
    assert (d / "part-000000.parquet").read_bytes() == first
    frame = load_run(d, dedupe=False)
    assert frame.step.tolist() == [1, 1, 2, 2, 3, 3, 4, 4] and frame.value.tolist()[-2:] == [4.5, -4.0]
    assert read_meta(d / "part-000001.parquet")["model_config"] == {"num_layers": 1}
    assert truncate_after(d, 4) == []


# -- non-finite values -----------------------------------------------------------------------------
class _Inject:
    """An observer that spoils one step: an inf weight before the forward, or a NaN gradient of
    layer 1's query weight coming out of the backward."""

    def __init__(self, holder: dict, step: int, where: str) -> None:
        self.holder, self.step, self.where = holder, step, where
        self.handle = None

    def begin_step(self, step: int) -> None:
        if step != self.step:
            return
        model = self.holder["model"]
        if self.where == "weight":
            with torch.no_grad():
                model.layers[2].mlp.down_proj.weight[0, 0] = math.inf
        else:
            self.handle = model.layers[1].attn.q_proj.weight.register_hook(lambda g: torch.full_like(g, math.nan))

    def after_backward(self, step: int) -> None:
        pass

    def end_step(self, info) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


def _spoiled_run(monkeypatch, tmp_path: Path, text: Path, where: str, every: int) -> pytest.ExceptionInfo:
    holder: dict = {}
    real = train_mod.build_model

    def build(cfg):
        holder["model"] = real(cfg)
        return holder["model"]

    monkeypatch.setattr(train_mod, "build_model", build)
    m, t = _cfg(text, steps=6, grad_clip=0.0)
    with pytest.raises(FloatingPointError) as err:
        train(m, t, tmp_path / "run", probe=ProbeConfig(every=every), observers=[_Inject(holder, 3, where)])
    return err


def test_non_finite_loss_names_the_first_layer_and_site(monkeypatch, tmp_path: Path, text: Path) -> None:
    err = _spoiled_run(monkeypatch, tmp_path, text, "weight", every=1)
    msg = str(err.value)
    assert msg.startswith("non-finite loss (nan) at step 3; ") or msg.startswith("non-finite loss (inf) at step 3; ")
    assert msg.endswith("first non-finite value at layer 2, site mlp_out (activation)")
    frame = load_run(tmp_path / "run")  # flushed before the error, readable
    assert sorted(frame.step.unique()) == [1, 2, 3]
    v = frame.set_index(["step", *KEY_COLUMNS[1:]]).value
    assert not math.isfinite(v[(3, 2, "mlp_out", "fwd", "absmax")])
    assert math.isfinite(v[(3, 2, "resid_mid", "fwd", "absmax")]) and math.isfinite(v[(2, 2, "mlp_out", "fwd", "rms")])
    assert not (tmp_path / "run" / "checkpoints" / "step_000003").exists()


def test_unrecorded_step_suggests_probing_every_step(monkeypatch, tmp_path: Path, text: Path) -> None:
    err = _spoiled_run(monkeypatch, tmp_path, text, "weight", every=2)
    assert str(err.value).endswith("the probes did not record step 3; rerun with --probe-every 1 to find the "
                                   "first layer and site that went non-finite")


def test_a_nan_gradient_is_recorded_and_training_stops_at_the_next_loss(monkeypatch, tmp_path: Path,
                                                                          text: Path) -> None:
    err = _spoiled_run(monkeypatch, tmp_path, text, "grad", every=1)
    # the NaN gradient of step 3 is recorded; the update spreads it to every weight, so step 4's
    # loss is NaN and its first non-finite activation is the embedding output
    assert str(err.value) == "non-finite loss (nan) at step 4; first non-finite value at layer 0, site resid_pre " \
                             "(activation)"
    v = load_run(tmp_path / "run").set_index(["step", *KEY_COLUMNS[1:]]).value
    assert math.isnan(v[(3, 1, "params", "none", "grad_norm")])
    assert math.isnan(v[(3, -1, "model", "none", "grad_norm")])
    assert math.isfinite(v[(3, 0, "params", "none", "grad_norm")])
    assert math.isfinite(v[(3, -1, "model", "none", "loss")])


def test_cli_non_finite_loss_is_one_line(tmp_path: Path, text: Path) -> None:
    run = tmp_path / "run"
    base = ["train", "--preset", "tiny", "--steps", "3", "--seq-len", "16", "--probe-every", "1",
            "--data", str(text), "--device", "cpu", "--out", str(run)]
    assert runner.invoke(app, base).exit_code == 0
    weights = run / "checkpoints" / "step_000003" / "model.safetensors"
    state = load_file(weights)
    state["model.layers.1.self_attn.o_proj.weight"][0, 0] = math.inf
    save_file(state, weights, metadata={"format": "pt"})
    res = runner.invoke(app, [*base[:4], "5", *base[5:], "--resume"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    error = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and error[0].endswith("at step 4; first non-finite value at layer 1, site attn_out "
                                                 "(activation)"), res.output
    assert sorted(load_run(run).step.unique()) == [1, 2, 3, 4]
