"""`gpas-probe report` of several runs: the comparison table as ``compare`` prints it (by seed groups with
paired differences where runs differ only by seed), a diagnosis per run, the gates figure when a run has
gates, training and profile figures each over their own runs, every data string escaped, one-line errors for
bad input, and a command that never imports torch."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys

from typer.testing import CliRunner

from gpas_probe.analysis.summary import COMPARE_LABELS, COMPARE_LEGEND
from gpas_probe.cli.main import app

runner = CliRunner()
TRAINING = ["variance", "heatmap", "ratio", "grad", "gates", "loss"]


def _ok(args: list[object]) -> str:
    res = runner.invoke(app, [str(a) for a in args], terminal_width=200)
    assert res.exit_code == 0, res.output
    return res.output


def _fails(args: list[object]) -> str:
    res = runner.invoke(app, [str(a) for a in args], terminal_width=200)
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res.output
    return errors[0]


def _table(page, css: str) -> dict:
    (table,) = [t for t in page.tables if t["class"] == css]
    return table


def test_two_runs_compared_diagnosed_and_drawn(made, tmp_path, read_page) -> None:
    out = tmp_path / "two.html"
    _ok(["report", made.pre, made.gpas, "-o", out])
    page = read_page(out)
    assert list(page.sections) == ["runs", "diagnosis", "comparison", "figures", "commands"]
    table = _table(page, "comparison")
    assert table["caption"] == "runs compared"
    assert table["header"] == ["run_id", *COMPARE_LABELS.values()]
    assert [row[0] for row in table["rows"]] == ["pre", "gpas"]
    printed = _ok(["compare", made.pre, made.gpas])
    for row in table["rows"]:  # the same numbers, as compare prints them
        words = [line.replace("│", " ").split() for line in printed.splitlines()]
        assert row in words, (row, printed)
    assert COMPARE_LEGEND in page.sections["comparison"]
    assert page.figures == TRAINING  # gates: the GPAS run has them
    assert len(page.summaries) == 2 and {t["caption"].split(":")[0] for t in page.tables
                                         if t["class"] == "evidence"} == {"pre", "gpas"}
    facts = _table(page, "facts")
    assert facts["header"] == ["", "pre", "gpas"]
    assert shlex.join(["gpas-probe", "compare", str(made.pre), str(made.gpas)]) in page.commands


def test_runs_and_profiles_of_the_same_name_together(made, tmp_path, read_page) -> None:
    out = tmp_path / "mixed.html"
    run, profile = made.pre, made.profiles / "pre"
    _ok(["report", run, profile, "-o", out])
    page = read_page(out)
    assert _table(page, "facts")["header"] == ["", "runs/pre", "profiles/pre"]  # distinct labels
    assert page.figures == [k for k in TRAINING if k != "gates"] + ["importance", "angular"]
    assert shlex.join(["gpas-probe", "plot", "variance", str(run), "-o", "variance.png"]) in page.commands
    assert shlex.join(["gpas-probe", "plot", "importance", str(profile), "-o", "importance.png"]) in page.commands
    assert "gates: no GPAS gates in runs/pre" in page.sections["figures"]


def test_seeds_are_compared_as_configurations(made, tmp_path, read_page) -> None:
    common = ["--preset", "tiny", "--steps", "4", "--probe-every", "2", "--eval-every", "2", "--data", made.corpus,
              "--seeds", "0,1"]
    _ok(["train", *common, "--out", tmp_path / "pre"])
    _ok(["train", *common, "--gpas", "--out", tmp_path / "pre-gpas"])
    runs = [tmp_path / f"{name}-seed{s}" for name in ("pre", "pre-gpas") for s in (0, 1)]
    out = tmp_path / "seeds.html"
    _ok(["report", *runs, "-o", out])
    page = read_page(out)
    table = _table(page, "comparison")
    assert table["caption"] == "configurations compared: means over their seeds"
    assert table["header"][:4] == ["group", "runs", "val", "val 95%"]
    assert [row[:2] for row in table["rows"]] == [["pre", "2"], ["pre-gpas", "2"]]
    printed = _ok(["compare", *runs]).splitlines()
    paired = [line for line in printed if line.startswith("pre-gpas - pre:")]
    assert len(paired) == 1 and paired[0] in page.sections["comparison"]
    assert page.figures == TRAINING  # drawn as each configuration's mean, as plot draws them


def test_every_string_from_the_data_is_escaped(made, tmp_path, read_page) -> None:
    evil = '<script>alert("run")</script>&<b>'
    folder = tmp_path / 'odd <i>&"name'
    shutil.copytree(made.gpas, folder)
    meta = folder / "probes" / "_meta.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "run_id": evil}))
    out = tmp_path / "odd.html"
    _ok(["report", folder, "-o", out])
    page = read_page(out)
    assert page.count("script") == 0 and page.count("b") == 0 and page.count("i") == 0
    assert evil in page.text and str(folder) in page.text
    assert evil in page.sections["diagnosis"] and evil in _table(page, "facts")["header"]
    assert shlex.join(["gpas-probe", "diagnose", str(folder)]) in page.commands


def test_bad_input_is_one_error_line(made, tmp_path) -> None:
    assert "no such run directory" in _fails(["report", tmp_path / "nowhere", "-o", tmp_path / "a.html"])
    empty = tmp_path / "empty"
    (empty / "probes").mkdir(parents=True)
    shutil.copy(made.pre / "probes" / "_meta.json", empty / "probes")
    assert "no probe rows" in _fails(["report", empty, "-o", tmp_path / "b.html"])
    assert ".html" in _fails(["report", made.pre, "-o", tmp_path / "c.txt"])
    (tmp_path / "d.html").mkdir()
    assert "is a folder" in _fails(["report", made.pre, "-o", tmp_path / "d.html"])
    assert not [p.name for p in tmp_path.iterdir() if p.is_file()]


def test_the_report_command_never_imports_torch(made, tmp_path) -> None:
    probe = ("import sys\nfrom gpas_probe.cli.main import app\ntry:\n    app(sys.argv[1:], prog_name='gpas-probe')\n"
             "except SystemExit as e:\n    code = e.code\nelse:\n    code = 0\n"
             "print('TORCH', 'torch' in sys.modules, 'EXIT', code)\n")
    res = subprocess.run([sys.executable, "-c", probe, "report", str(made.gpas), "-o", str(tmp_path / "r.html")],
                         capture_output=True, text=True, env={"MPLBACKEND": "Agg", "PATH": "", "HOME": str(tmp_path)},
                         timeout=300)
    assert "TORCH False EXIT 0" in res.stdout, res.stdout + res.stderr[-2000:]
    assert (tmp_path / "r.html").is_file()


def test_every_option_has_help() -> None:
    res = runner.invoke(app, ["report", "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "report.html" in res.output and "<bool>" not in res.output
    for line in res.output.splitlines():
        cells = [c.strip() for c in line.strip("│ ").split("  ") if c.strip()]
        if cells and cells[0].startswith("--"):
            assert not cells[-1].startswith(("-", "<")), f"{line.strip()} has no help"
