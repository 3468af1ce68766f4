"""Which checkpoints a run keeps (`--keep-last`), and that every file a run writes has the same mode."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gpas_probe import ModelConfig, TrainConfig, train
from gpas_probe.checkpoints import step_checkpoints, step_from_name
from gpas_probe.cli.main import app

runner = CliRunner()


def _train(out: Path, **kw: object) -> None:
    train(ModelConfig.from_preset("tiny"), TrainConfig.from_preset("tiny", steps=8, autosave=0, **kw), out,
          progress="off")


def _steps(run: Path) -> list[int | None]:
    return [step_from_name(c) for c in step_checkpoints(run)]


def test_every_checkpoint_is_kept_by_default(tmp_path: Path) -> None:
    _train(tmp_path / "run", checkpoint_every=2)
    assert _steps(tmp_path / "run") == [2, 4, 6, 8]


@pytest.mark.parametrize("keep, want", [(1, [8]), (2, [6, 8]), (3, [4, 6, 8]), (9, [2, 4, 6, 8])])
def test_keep_last_keeps_the_latest(tmp_path: Path, keep: int, want: list[int]) -> None:
    _train(tmp_path / "run", checkpoint_every=2, keep_last=keep)
    assert _steps(tmp_path / "run") == want


def test_keep_last_from_the_command_line_and_on_resume(tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--steps", "6", "--checkpoint-every", "2", "--keep-last", "2",
            "--probe-every", "0", "--out", str(run)]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert _steps(run) == [4, 6]
    res = runner.invoke(app, ["train", "--out", str(run), "--steps", "10", "--resume"])
    assert res.exit_code == 0, res.output
    assert _steps(run) == [8, 10]  # the run's own setting, kept in run.json


def test_keep_last_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="keep last must be >= 0"):
        TrainConfig(keep_last=-1)


def test_every_file_a_run_writes_has_the_same_mode(tmp_path: Path) -> None:
    """The weights used to be private (0600, as safetensors writes them) beside 0644 files."""
    _train(tmp_path / "run", checkpoint_every=4)
    modes = {f.relative_to(tmp_path): stat.S_IMODE(f.stat().st_mode)
             for f in (tmp_path / "run").rglob("*") if f.is_file() and not f.name.startswith(".")}
    assert any(f.name == "model.safetensors" for f in modes)
    assert len(set(modes.values())) == 1, modes
