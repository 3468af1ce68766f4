"""``train --seeds``, and ``compare``/``plot`` grouping the seeds of one configuration."""

from __future__ import annotations

import json

import pytest
from helpers import assert_figure_file
from typer.testing import CliRunner

from gpas_probe.analysis.seeds import run_groups
from gpas_probe.cli.main import app
from gpas_probe.store import load_runs
from gpas_probe.table import aggregate_runs

runner = CliRunner()


def _ok(args: list[str]) -> str:
    res = runner.invoke(app, args, terminal_width=200)
    assert res.exit_code == 0, res.output
    return res.output


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    root = tmp_path_factory.mktemp("seeds")
    for flag, name in (("--no-gpas", "pre"), ("--gpas", "pre-gpas")):
        _ok(["train", "--preset", "tiny", flag, "--steps", "6", "--probe-every", "3", "--seeds", "0,1,2",
             "--out", str(root / name)])
    return root


def test_one_run_folder_per_seed(seeded) -> None:
    for name in ("pre", "pre-gpas"):
        for seed in (0, 1, 2):
            meta = json.loads((seeded / f"{name}-seed{seed}" / "run.json").read_text())
            assert meta["train_config"]["seed"] == seed and meta["model_config"]["gpas"] is (name == "pre-gpas")
    assert not (seeded / "pre").exists()


def test_compare_groups_the_seeds_and_pairs_them(seeded) -> None:
    runs = [str(p) for p in sorted(seeded.iterdir())]
    text = _ok(["compare", *runs])
    assert "means over their seeds" in text and "val 95%" in text
    assert "pre-gpas" in text and "pre " in text and "3 paired seeds" in text
    assert "the seed-to-seed noise" in text
    single = _ok(["compare", str(seeded / "pre-seed0"), str(seeded / "pre-gpas-seed0")])
    assert "runs compared" in single and "paired" not in single


def test_plot_draws_each_configuration_with_a_band_across_seeds(seeded, tmp_path) -> None:
    runs = [str(p) for p in sorted(seeded.iterdir())]
    grouped, each = tmp_path / "grouped.png", tmp_path / "each.png"
    _ok(["plot", "loss", *runs, "-o", str(grouped)])
    _ok(["plot", "loss", *runs, "-o", str(each), "--each-run"])
    groups, _ = run_groups(runs)
    assert set(groups.values()) == {"pre", "pre-gpas"}
    data = load_runs(runs)
    assert_figure_file(grouped, "loss", aggregate_runs(data, groups))  # two lines, each with its band
    assert_figure_file(each, "loss", data)  # six lines


@pytest.mark.parametrize("args, message", [
    (["--seeds", "0,x"], "--seeds must be a comma list of integers"),
    (["--seeds", "1,1"], "distinct non-negative"),
    (["--seeds", "0,1", "--seed", "3"], "--seed and --seeds exclude each other"),
])
def test_bad_seeds_are_one_line(tmp_path, args: list[str], message: str) -> None:
    res = runner.invoke(app, ["train", "--preset", "tiny", "--steps", "2", "--out", str(tmp_path / "r"), *args])
    assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output
    assert not any(tmp_path.iterdir())
