"""`gpas-probe plot | info | compare | demo` end to end on tiny runs."""

from __future__ import annotations

import pandas as pd
import pytest
from helpers import assert_figure_file
from typer.testing import CliRunner

from gpas_probe.cli.main import app
from gpas_probe.demo import DEMO_FIGURES
from gpas_probe.store import load_runs

runner = CliRunner()


def _ok(args: list[str]) -> str:
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    return res.output


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    out = []
    for flag in ("--no-gpas", "--gpas"):
        run = root / flag.strip("-")
        _ok(["train", "--preset", "tiny", flag, "--steps", "6", "--probe-every", "2", "--eval-every", "3",
             "--out", str(run)])
        out.append(run)
    return out


@pytest.mark.parametrize("kind", DEMO_FIGURES)
@pytest.mark.parametrize("suffix", ["png", "svg", "pdf"])
def test_plot_every_kind(runs, tmp_path, kind, suffix):
    target = tmp_path / f"{kind}.{suffix}"
    _ok(["plot", kind, *map(str, runs), "-o", str(target)])
    assert_figure_file(target, kind, load_runs(runs))


def test_plot_rejects_unknown_suffix(runs, tmp_path):
    res = runner.invoke(app, ["plot", "variance", str(runs[0]), "-o", str(tmp_path / "x.txt")])
    assert res.exit_code == 2 and "error:" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "x.txt").exists()


def test_info_reports_the_run(runs):
    text = _ok(["info", str(runs[1])])
    for word in ("steps", "layers", "sites", "stats", "rows", "bytes/row"):
        assert word in text
    assert "4 recorded by the probes, 6 with rows, 1..6" in text  # probes on 1, 2, 4, 6 (--probe-every 2)
    assert "resid_post" in text and "alpha" in text


def test_compare_table_has_both_runs(runs):
    text = _ok(["compare", *map(str, runs)])
    assert "no-gpas" in text and "gpas" in text and "var ratio" in text and "deepest quarter" in text


def test_missing_run_is_one_line_error(tmp_path):
    for args in (["info", str(tmp_path / "nope")], ["compare", str(tmp_path / "nope")],
                 ["plot", "loss", str(tmp_path / "nope"), "-o", str(tmp_path / "a.png")]):
        res = runner.invoke(app, args)
        assert res.exit_code == 2, args
        assert "error:" in res.output and "Traceback" not in res.output


def test_probe_every_zero_records_nothing(tmp_path):
    run = tmp_path / "run"
    text = _ok(["train", "--preset", "tiny", "--steps", "2", "--probe-every", "0", "--out", str(run)])
    assert "probes in" not in text and not (run / "probes").exists()


def test_probe_stats_subset(tmp_path):
    run = tmp_path / "run"
    _ok(["train", "--preset", "tiny", "--steps", "2", "--probe-every", "1", "--probe-stats", "model,gpas",
         "--gpas", "--out", str(run)])
    df = pd.read_parquet(run / "probes")
    assert set(df["site"]) == {"model", "gpas"}


def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    text = _ok(["demo", "--preset", "tiny", "--steps", "6", "--probe-every", "3", "--out", str(out)])
    for kind in DEMO_FIGURES:
        assert (out / "figures" / f"{kind}.png").stat().st_size > 1000
    assert "pre+GPAS" in text or "pre-gpas" in text
    assert (out / "pre" / "probes").is_dir() and (out / "pre-gpas" / "probes").is_dir()
    res = runner.invoke(app, ["demo", "--preset", "tiny", "--steps", "2", "--out", str(out)])
    assert res.exit_code == 2 and "--overwrite" in res.output  # an earlier demo is never replaced silently
    _ok(["demo", "--preset", "tiny", "--steps", "2", "--probe-every", "1", "--out", str(out), "--overwrite"])


def _commands() -> list[list[str]]:
    import typer.main

    group = typer.main.get_command(app)
    paths = []
    for name, cmd in group.commands.items():
        paths.append([name])
        paths += [[name, sub] for sub in getattr(cmd, "commands", {})]
    return paths


@pytest.mark.parametrize("path", _commands(), ids=lambda p: " ".join(p))
def test_every_command_has_help(path):
    text = _ok([*path, "--help"])
    assert "Usage:" in text


def test_all_commands_are_registered():
    names = {p[0] for p in _commands()}
    assert {"demo", "train", "plot", "info", "compare", "profile", "diagnose"} <= names
