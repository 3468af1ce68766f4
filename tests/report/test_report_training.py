"""`gpas-probe report` of one training run: a self-contained page with a viewport tag, the run's metadata,
the verdict ``diagnose`` prints, one figure per training figure kind (no gates for a Pre-LN run, with a note),
and commands that regenerate each piece and run as they are."""

from __future__ import annotations

import re
import shlex

import pytest
from typer.testing import CliRunner

from gpas_probe.analysis.diagnosis import STATUSES, diagnose_runs
from gpas_probe.cli.main import app
from gpas_probe.store import load_runs

runner = CliRunner()
KINDS = ["variance", "heatmap", "ratio", "grad", "loss"]  # a run without GPAS has no gates figure


def _ok(args: list[object]) -> str:
    res = runner.invoke(app, [str(a) for a in args], terminal_width=200)
    assert res.exit_code == 0, res.output
    return res.output


@pytest.fixture(scope="module")
def written(made):
    """The report of the Pre-LN run, written where it goes without -o, and what the command printed."""
    output = _ok(["report", made.pre])
    return made.pre / "report.html", output


def test_without_output_the_report_goes_to_the_runs_folder_and_says_so(written) -> None:
    path, output = written
    assert path.is_file()
    assert f"wrote {path}" in output


def test_the_page_has_a_viewport_and_its_sections(written, read_page) -> None:
    page = read_page(written[0])
    assert page.doctype and page.count("html") == 1 and page.count("main") == 1
    viewport = [a for t, a in page.attrs if t == "meta" and a.get("name") == "viewport"]
    assert viewport and "width=device-width" in viewport[0]["content"]
    assert list(page.sections) == ["runs", "diagnosis", "figures", "commands"]  # one run: nothing to compare
    assert "report: pre" in page.text


def test_the_metadata_of_the_run(written, made, read_page) -> None:
    runs = read_page(written[0]).sections["runs"]
    for fact in ("training run", "tiny (its model settings)", "4 layers × 32 wide", "pre", str(made.corpus),
                 "gpas-probe 0.1.0", "torch ", "probe schema 1", "finished at step 4", "3 with per-layer rows"):
        assert fact in runs, fact


def test_the_verdict_and_lines_are_those_diagnose_prints(written, made, read_page) -> None:
    page = read_page(written[0])
    printed = _ok(["diagnose", made.pre]).splitlines()
    verdicts = [line for line in printed if line.startswith("verdict:")]
    assert len(verdicts) == 1 and page.summaries == verdicts
    for line in printed:
        if line.startswith(("variance growth:", "signals:")):
            assert line in page.sections["diagnosis"], line
    d = diagnose_runs(load_runs([made.pre]))["pre"]
    assert d.verdict in page.text
    (evidence,) = [t for t in page.tables if t["class"] == "evidence"]
    assert evidence["header"][0] == "layer" and evidence["header"][-1] == "status"
    assert [row[-1] for row in evidence["rows"]] == list(d.layers["status"])
    assert set(d.layers["status"]) <= set(STATUSES)


def test_one_figure_per_kind_and_a_note_for_the_missing_gates(written, read_page) -> None:
    page = read_page(written[0])
    assert page.figures == KINDS
    images = [a["src"] for t, a in page.attrs if t == "img"]
    assert len(images) == len(KINDS) and all(src.startswith("data:image/png;base64,") for src in images)
    assert page.count("svg") == 0
    assert "gates: no GPAS gates in pre" in page.sections["figures"]


def test_nothing_is_fetched_to_view_it(written, read_page) -> None:
    html = written[0].read_text(encoding="utf-8")
    page = read_page(written[0])
    links = page.attr_values("src", "href", "xlink:href", "srcset", "data", "poster", "action")
    assert links and not [v for v in links if re.match(r"\s*(https?:)?//", v, re.I)]
    assert all(v.startswith(("data:", "#")) for v in links)
    for tag in ("script", "link", "iframe", "object", "embed"):
        assert page.count(tag) == 0, tag
    assert "@import" not in html and "url(" not in html


def test_the_commands_regenerate_each_piece(written, made, tmp_path, monkeypatch, read_page) -> None:
    commands = read_page(written[0]).commands
    run = str(made.pre)
    expected = [["report", run, "-o", str(written[0])], ["info", run], ["diagnose", run],
                *(["plot", kind, run, "-o", f"{kind}.png"] for kind in KINDS)]
    assert [shlex.split(c) for c in commands] == [["gpas-probe", *words] for words in expected]
    monkeypatch.chdir(tmp_path)  # the figures' -o paths are relative: run where the reader is
    variance = shlex.split(commands[3])
    assert variance[:3] == ["gpas-probe", "plot", "variance"]
    _ok(variance[1:])
    assert (tmp_path / "variance.png").stat().st_size > 1000


def test_svg_figures_are_inline(made, tmp_path, read_page) -> None:
    out = tmp_path / "svg.html"
    _ok(["report", made.pre, "--svg", "-o", out])
    page = read_page(out)
    assert page.figures == KINDS and page.count("img") == 0
    assert page.count("svg") == len(KINDS)
    assert all("viewbox" in a for t, a in page.attrs if t == "svg")  # scales with the page's width
    assert not [v for v in page.attr_values("src", "href", "xlink:href") if re.match(r"\s*(https?:)?//", v)]
