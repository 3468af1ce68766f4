"""``gpas-probe profile`` end to end, and its one-line errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import typer
from profile_runs import SEQ
from typer.testing import CliRunner

from gpas_probe.checkpoints import step_checkpoints
from gpas_probe.cli.profile import profile_cmd
from gpas_probe.store import load_run, read_meta

runner = CliRunner()


@pytest.fixture
def run(tiny_gpas_run):
    return tiny_gpas_run


def _app() -> typer.Typer:
    app = typer.Typer(pretty_exceptions_enable=False, add_completion=False)

    @app.callback()
    def main() -> None:
        """Test app."""

    app.command("profile")(profile_cmd)
    return app


def test_cli_profile_end_to_end(run, short_text, tmp_path) -> None:
    out = tmp_path / "profiles"
    args = ["profile", str(run), "--out", str(out), "--data", str(short_text), "--batches", "2",
            "--batch-size", "2", "--seq-len", str(SEQ)]
    res = runner.invoke(_app(), args)
    assert res.exit_code == 0, res.output
    assert "profiled 2 checkpoint(s) (step 2, 4)" in res.output
    frame = load_run(out / "myrun")
    assert sorted(frame["step"].unique()) == [2, 4]
    imp = frame[frame["site"].str.startswith(("importance", "angular_n"))]
    intervals = {f"{stat}_{end}" for stat in ("deletion_delta", "block_influence", "angular_distance")
                 for end in ("lo", "hi")}
    assert set(imp["stat"]) == {"deletion_delta", "deletion_loss", "block_influence", "angular_distance",
                                "angular_distance_norm"} | intervals
    assert (imp["direction"] == "none").all() and imp["layer"].between(0, 3).all()
    res = runner.invoke(_app(), args)
    assert res.exit_code == 2 and "already exists" in res.output and "Traceback" not in res.output
    assert runner.invoke(_app(), args + ["--overwrite", "--latest", "--dtype", "bf16"]).exit_code == 0
    assert set(load_run(out / "myrun")["step"]) == {4}
    # --skip-first-position: position 0 of every window is left out, and the profile says so
    res = runner.invoke(_app(), args + ["--overwrite", "--latest", "--skip-first-position", "--outlier-factor", "4"])
    assert res.exit_code == 0, res.output
    meta = read_meta(out / "myrun")["profile"]
    assert (meta["skip_first_position"], meta["outlier_factor"]) == (True, 4.0)
    frame = load_run(out / "myrun")
    pos0 = frame[(frame["stat"] == "outlier_pos0_frac")]
    assert len(pos0) and (pos0["value"] == 0).all()  # position 0 is not kept, so it is never an outlier


def _bad(kind: str, src, tmp_path):
    bad = tmp_path / "bad"
    if kind == "nonexistent":
        return bad
    shutil.copytree(src, bad)
    (bad / "trainer_state.pt").unlink()
    config = json.loads((bad / "config.json").read_text())
    if kind == "no-config":
        (bad / "config.json").unlink()
    elif kind == "no-weights":
        (bad / "model.safetensors").unlink()
    elif kind == "truncated":
        blob = (bad / "model.safetensors").read_bytes()
        (bad / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    elif kind == "shapes":
        config["gpas_probe"]["model_config"]["intermediate_size"] = 96
        (bad / "config.json").write_text(json.dumps(config))
    elif kind == "architecture":
        config = {k: v for k, v in config.items() if k != "gpas_probe"}
        config.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
        (bad / "config.json").write_text(json.dumps(config))
    elif kind == "bad-json":
        (bad / "config.json").write_text("{not json")
    return bad


@pytest.mark.parametrize("kind, message", [
    ("nonexistent", "checkpoint not found"),
    ("no-config", "no config.json"),
    ("no-weights", "missing model.safetensors"),
    ("truncated", "unreadable weights"),
    ("shapes", "the config implies"),
    ("architecture", "is not supported natively"),
    ("bad-json", "not valid JSON"),
    ("vocab", "token id 300 is beyond the model's vocabulary of 256"),
])
def test_cli_bad_input_is_one_line(run, short_text, tmp_path, kind, message) -> None:
    data = short_text
    if kind == "vocab":
        data = tmp_path / "ids.npy"
        np.save(data, np.arange(301))
        ckpt = run
    else:
        ckpt = _bad(kind, step_checkpoints(run)[-1], tmp_path)
    if kind == "architecture":  # imported once beforehand: a first, cold import alone can outlast the
        import transformers  # progress report's quiet first second, and a progress line would precede the error

        transformers.GPT2LMHeadModel  # noqa: B018
    out = tmp_path / "out"
    res = runner.invoke(_app(), ["profile", str(ckpt), "--out", str(out), "--data", str(data),
                                 "--batches", "1", "--batch-size", "1", "--seq-len", "8"])
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], res.output
    assert "Traceback" not in res.output
    assert not out.exists()  # nothing written
