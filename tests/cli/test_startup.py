"""Starting the CLI costs little: `--version` and the commands that only read runs (info, compare, diagnose,
plot) never import torch; `--help` shows no value placeholder for flags, and every option has help."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gpas_probe.cli.main import app

runner = CliRunner()

#: Runs the CLI in a fresh interpreter, then says whether torch was imported.
PROBE = """
import sys
from gpas_probe.cli.main import app
try:
    app(sys.argv[1:], prog_name="gpas-probe")
except SystemExit as e:
    code = e.code
else:
    code = 0
print("TORCH", "torch" in sys.modules, "EXIT", code)
"""


def _fresh(args: list[str], cwd: Path) -> str:
    res = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, cwd=cwd,
                         env={"MPLBACKEND": "Agg", "PATH": "", "HOME": str(cwd), "COLUMNS": "100"}, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


@pytest.fixture(scope="module")
def profiled(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("startup")
    run = root / "runs" / "a"
    res = runner.invoke(app, ["train", "--preset", "tiny", "--steps", "4", "--probe-every", "2", "--out", str(run)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["profile", str(run), "--out", str(root / "profiles"), "--batches", "1"])
    assert res.exit_code == 0, res.output
    return root


@pytest.mark.parametrize("args", [
    ["--version"],
    ["info", "runs/a"],
    ["compare", "runs/a", "profiles/a"],
    ["diagnose", "profiles/a"],
    ["plot", "variance", "runs/a", "-o", "v.png"],
    ["plot", "importance", "profiles/a", "-o", "i.png"],
], ids=lambda a: " ".join(a[:2]))
def test_commands_that_read_runs_never_import_torch(profiled: Path, args: list[str]) -> None:
    out = _fresh(args, profiled)
    assert "TORCH False EXIT 0" in out, out


def test_training_does_import_torch_so_the_probe_can_fail(profiled: Path) -> None:
    """The check above can fail: a command that trains reports torch imported."""
    out = _fresh(["train", "--preset", "tiny", "--steps", "1", "--probe-every", "0", "--out", "runs/b"], profiled)
    assert "TORCH True EXIT 0" in out, out


@pytest.mark.parametrize("command", ["train", "demo", "profile", "diagnose", "plot variance", "info", "compare"])
def test_help_shows_no_placeholder_for_flags_and_helps_every_option(command: str) -> None:
    res = runner.invoke(app, [*command.split(), "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "<bool>" not in res.output
    for line in res.output.splitlines():
        cells = [c.strip() for c in line.strip("│ ").split("  ") if c.strip()]
        if cells and cells[0].startswith("--"):
            assert not cells[-1].startswith(("-", "<")), f"{command}: {line.strip()} has no help"


def test_the_scheme_option_lists_its_choices_in_train_and_demo() -> None:
    for command in ("train", "demo"):
        res = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
        assert "pre, post, sandwich, deepnorm, mixln, lns, lns-gain" in res.output, command


def test_the_gate_gradient_clip_reads_like_the_global_clip() -> None:
    res = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert "--grad-clip" in res.output and "--gate-grad-clip" in res.output


def test_plot_kinds_are_the_figures_the_library_draws() -> None:
    from gpas_probe.cli.analyze import FIGURE_HELP
    from gpas_probe.plots import FIGURES

    assert list(FIGURE_HELP) == list(FIGURES)
