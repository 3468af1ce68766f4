"""Commands that lead on: `train` and `profile` end with the next commands and the real paths; `plot`
writes into the run's `figures/` without `-o` and takes --layers; an output folder holding one run stands
for it, one holding several lists them; runs whose folders share a name get distinct labels; `info` lists
names in natural order; `profile` evaluates at the run's own training length and says so."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gpas_probe.cli.analyze import parse_layers
from gpas_probe.cli.main import app
from gpas_probe.profile import PROFILE_FILE
from gpas_probe.store.reader import natural_key

runner = CliRunner()


def _ok(args: list[str]) -> str:
    res = runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    return res.output


def _next_commands(output: str) -> list[list[str]]:
    lines = output.splitlines()
    start = lines.index("next:")
    return [shlex.split(line) for line in lines[start + 1:] if line.startswith("  gpas-probe ")]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lead-on")


@pytest.fixture(scope="module")
def trained(root: Path) -> tuple[Path, str]:
    run = root / "runs" / "x"
    out = _ok(["train", "--preset", "tiny", "--steps", "4", "--seq-len", "24", "--probe-every", "2", "--out", run])
    return run, out


@pytest.fixture(scope="module")
def profiled(root: Path, trained: tuple[Path, str]) -> tuple[Path, str]:
    run, _ = trained
    out = _ok(["profile", run, "--out", root / "profiles", "--batches", "1"])
    return root / "profiles" / "x", out


def test_train_suggests_the_next_commands_and_they_run(trained: tuple[Path, str], root: Path) -> None:
    run, out = trained
    commands = _next_commands(out)
    assert [c[1] for c in commands] == ["plot", "diagnose", "profile"]
    assert all(str(run) in c for c in commands)
    plot = commands[0]
    _ok(plot[1:])
    assert (run / "figures" / "variance.png").is_file()  # plot's default output


def test_profile_suggests_diagnose_and_plot_on_its_folder(profiled: tuple[Path, str]) -> None:
    folder, out = profiled
    commands = _next_commands(out)
    assert [c[1] for c in commands] == ["diagnose", "plot"] and all(str(folder) in c for c in commands)
    assert "verdict:" in _ok(commands[0][1:])


def test_profile_evaluates_at_the_runs_training_length_and_says_so(profiled: tuple[Path, str]) -> None:
    folder, out = profiled
    data = json.loads((folder / PROFILE_FILE).read_text())["data"]
    assert data["seq_len"] == 24 and data["seq_len_from"] == "the run's training length"
    assert "windows of 24 tokens (the run's training length)" in out


def test_profile_of_a_lone_checkpoint_takes_the_models_maximum(root: Path, trained: tuple[Path, str]) -> None:
    run, _ = trained
    lone = root / "lone"
    (lone).mkdir()
    ckpt = sorted((run / "checkpoints").iterdir())[-1]
    for f in ckpt.iterdir():
        (lone / f.name).write_bytes(f.read_bytes())
    max_len = json.loads((lone / "config.json").read_text())["max_position_embeddings"]
    out = _ok(["profile", lone, "--out", root / "lone-profiles", "--batches", "1", "--no-importance"])
    data = json.loads((root / "lone-profiles" / "lone" / PROFILE_FILE).read_text())["data"]
    assert data["seq_len"] == min(max_len, 256) and f"windows of {data['seq_len']} tokens" in out


def test_an_output_folder_holding_one_run_stands_for_it(profiled: tuple[Path, str], root: Path) -> None:
    folder, _ = profiled
    assert "run_id: x" in _ok(["info", root / "profiles"])
    assert "verdict:" in _ok(["diagnose", root / "profiles"])
    _ok(["plot", "importance", root / "profiles", "-o", root / "imp.png"])


def test_an_output_folder_holding_several_runs_lists_them(root: Path, trained: tuple[Path, str]) -> None:
    run, _ = trained
    twin = root / "runs" / "y"
    _ok(["train", "--preset", "tiny", "--steps", "2", "--probe-every", "1", "--out", twin])
    for command in (["info"], ["diagnose"], ["plot", "variance"]):
        res = runner.invoke(app, [*command, str(root / "runs")])
        assert res.exit_code == 2, res.output
        line = res.output.strip()
        assert line.startswith("error:") and "holds 2 runs" in line and str(run) in line and str(twin) in line


def test_runs_whose_folders_share_a_name_get_distinct_labels(trained: tuple[Path, str],
                                                              profiled: tuple[Path, str]) -> None:
    run, _ = trained
    folder, _ = profiled
    out = _ok(["compare", run, folder])
    assert re.search(r"runs/x\b", out) and re.search(r"profiles/x\b", out)
    _ok(["plot", "variance", run, folder, "-o", folder.parent / "both.png"])


def test_plot_of_several_runs_writes_beside_them(root: Path, trained: tuple[Path, str]) -> None:
    run, _ = trained
    out = _ok(["plot", "loss", run, root / "runs" / "y"])
    assert (root / "runs" / "figures" / "loss.png").is_file() and "runs/figures/loss.png" in out


def test_plot_layers_option(trained: tuple[Path, str], root: Path) -> None:
    run, _ = trained
    _ok(["plot", "variance", run, "--layers", "0-1", "-o", root / "v01.png"])
    res = runner.invoke(app, ["plot", "variance", str(run), "--layers", "1-x"])
    assert res.exit_code == 2 and "--layers must be layer numbers" in res.output


@pytest.mark.parametrize("text, want", [("0-3,8", [0, 1, 2, 3, 8]), ("5", [5]), ("2,2,1", [1, 2]),
                                        (" 0 - 1 , 3", [0, 1, 3])])
def test_parse_layers(text: str, want: list[int]) -> None:
    assert parse_layers(text) == want


@pytest.mark.parametrize("text", ["", "a", "3-1", "-2", "1-", ","])
def test_parse_layers_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="--layers"):
        parse_layers(text)


def test_natural_order_puts_numbers_in_order() -> None:
    names = ["angular_n10", "angular_n2", "attn", "angular_n1", "angular_n11"]
    assert sorted(names, key=natural_key) == ["angular_n1", "angular_n2", "angular_n10", "angular_n11", "attn"]


def test_info_lists_names_in_natural_order(profiled: tuple[Path, str]) -> None:
    folder, _ = profiled
    out = _ok(["info", folder])
    for field in ("sites", "stats"):
        line = next(line for line in out.splitlines() if line.startswith(f"{field}:"))
        names = [s.strip() for s in line.removeprefix(f"{field}:").split(",")]
        assert names == sorted(names, key=natural_key) and len(names) > 3
