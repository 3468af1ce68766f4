"""``gpas-probe diagnose``: the evidence table and verdict, JSON, exit codes, one-line errors; the table
whole into a pipe and folded, never cut, in a narrow terminal; models under 3 layers; the vote's rule in
``--help``."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import typer
from diagnosis_tables import L, healthy_table, table, underused_table
from rich.console import Console
from typer.testing import CliRunner

from gpas_probe.analysis.diagnosis import diagnose
from gpas_probe.cli.diagnose import diagnose_cmd, evidence_table
from gpas_probe.store import ARROW_SCHEMA

runner = CliRunner()
cli = typer.Typer()
cli.command("diagnose")(diagnose_cmd)


@cli.callback()
def _root() -> None:
    """Test app."""


def _write(folder, frame: pd.DataFrame):
    (folder / "probes").mkdir(parents=True)
    pq.write_table(pa.Table.from_pandas(frame, schema=ARROW_SCHEMA, preserve_index=False),
                   folder / "probes" / "part-000000.parquet")
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple:
    root = tmp_path_factory.mktemp("cli")
    return _write(root / "sick", underused_table()), _write(root / "fine", healthy_table())


def test_cli_table_and_verdict(folders) -> None:
    sick, fine = folders
    res = runner.invoke(cli, ["diagnose", str(sick), str(fine)])
    assert res.exit_code == 0, res.output
    assert "verdict: underuse" in res.stdout and "verdict: ok" in res.stdout
    assert "shortcut/branch" in res.stdout and "deletion" in res.stdout and "angle" in res.stdout
    assert "variance growth: ×2 per layer" in res.stdout and "decided by deletion" in res.stdout


def test_cli_shows_intervals_findings_and_advice(tmp_path) -> None:
    deep = np.arange(L) >= L // 2
    data = table("thin", deletion=np.where(deep, 0.1, 0.4), half_width=np.where(deep, 0.06, 0.05), tokens=512)
    res = runner.invoke(cli, ["diagnose", str(_write(tmp_path / "thin", data))], terminal_width=200)
    assert res.exit_code == 0, res.output
    assert "0.1 [0.04, 0.16]" in res.stdout and "inconclusive" in res.stdout
    assert "verdict: inconclusive" in res.stdout and "to settle it: use at least 8,192 evaluation tokens" in res.stdout
    res = runner.invoke(cli, ["diagnose", str(_write(tmp_path / "run", table("run", var=4.0 ** np.arange(L))))])
    assert "rests on correlational signals" in res.stdout


def test_cli_json(folders) -> None:
    sick, fine = folders
    res = runner.invoke(cli, ["diagnose", str(sick), str(fine), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["verdict"] == "underuse" and [r["verdict"] for r in out["runs"]] == ["underuse", "ok"]
    assert out["runs"][0] == json.loads(json.dumps(diagnose(underused_table()).to_dict()))


def test_cli_strict_exit_codes_and_overrides(folders) -> None:
    sick, fine = folders
    assert runner.invoke(cli, ["diagnose", str(sick), "--strict"]).exit_code == 1
    assert runner.invoke(cli, ["diagnose", str(fine), "--strict"]).exit_code == 0
    # a profile's causal evidence decides: the correlational vote's count changes nothing
    assert runner.invoke(cli, ["diagnose", str(sick), "--strict", "--min-flags", "6"]).exit_code == 1
    assert runner.invoke(cli, ["diagnose", str(sick), "--strict", "--min-deletion", "-1",
                               "--min-deletion-rel", "0"]).exit_code == 0
    res = runner.invoke(cli, ["diagnose", str(fine), "--strict", "--json", "--min-deletion", "1"])
    assert res.exit_code == 1 and json.loads(res.stdout)["verdict"] == "underuse"  # a 1-nat floor: all underused


def test_cli_bad_input_is_one_line_exit_2(folders, tmp_path) -> None:
    res = runner.invoke(cli, ["diagnose", str(tmp_path / "missing")])
    assert res.exit_code == 2 and res.stderr.startswith("error:") and len(res.stderr.strip().splitlines()) == 1
    res = runner.invoke(cli, ["diagnose", str(folders[0]), "--min-fraction", "2"])
    assert res.exit_code == 2 and "min_fraction" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_cli_step_not_recorded_is_one_line_exit_2(folders) -> None:
    res = runner.invoke(cli, ["diagnose", str(folders[0]), "--step", "99999"])
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1
    assert res.stderr.strip() == "error: step 99999 was not recorded in sick; recorded steps: 100"
    assert runner.invoke(cli, ["diagnose", str(folders[0]), "--step", "100"]).exit_code == 0


def test_cli_models_under_three_layers(tmp_path) -> None:
    two = table("two", var=[1.0, 8.0], ratio=[3.0, 30.0], grad=[1.0, 0.1], num_layers=2)
    folder = _write(tmp_path / "two", two)
    res = runner.invoke(cli, ["diagnose", str(folder)])
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert "variance growth: too few layers (2) to fit a growth rate; deep-quarter shortcut/branch ratio 30" in lines
    assert "verdict: insufficient data — 2 layers: too few to compare shallow and deep layers" in lines
    assert "  missing variance: 2 layers: too few to compare shallow and deep layers" in lines
    assert "R² = 1" not in res.stdout
    summary = json.loads(runner.invoke(cli, ["diagnose", str(folder), "--json"]).stdout)["runs"][0]["summary"]
    assert summary["growth_rate"] is None and summary["growth_r2"] is None
    assert summary["growth_missing"] == "too few layers (2) to fit a growth rate"
    assert summary["reason"] == "2 layers: too few to compare shallow and deep layers"


def test_cli_a_signal_is_listed_as_used_or_missing_never_both(tmp_path) -> None:
    one = table("one", var=[2.0], ratio=[3.0], grad=[1.0], deletion=[0.3], num_layers=1)
    res = runner.invoke(cli, ["diagnose", str(_write(tmp_path / "one", one))])
    assert res.exit_code == 0, res.output
    signals = next(line for line in res.stdout.splitlines() if line.startswith("signals:"))
    assert signals == "signals: deletion @ step 100, ratio @ step 100 (read: deletion: deletion_delta, " \
                      "ratio: shortcut_branch_ratio)"
    assert "  missing grad: 1 layer: too few to compare shallow and deep layers" in res.stdout.splitlines()
    assert "verdict: insufficient data — 1 layer: too few to compare shallow and deep layers" in res.stdout


def test_cli_min_flags_help_states_the_vote_rule() -> None:
    command = typer.main.get_command(cli).commands["diagnose"]
    help_text = next(p.help for p in command.params if p.name == "min_flags")
    assert "(default: at least half of the available signals and at least 2 (all of them when fewer than 2 are " \
           "available))" in help_text


def _wide_table() -> pd.DataFrame:
    rng = np.random.default_rng(1)
    return table("a-rather-long-run-name", var=np.exp(rng.uniform(0, 3, L)), ratio=rng.uniform(1, 20, L),
                 grad=rng.uniform(0.1, 2, L), deletion=rng.uniform(-0.01, 0.2, L), angular=rng.uniform(0.01, 0.2, L),
                 half_width=rng.uniform(0.001, 0.05, L), tokens=512)


HEADERS = ("layer", "deletion Δloss [95%]", "angle to next [95%]", "var / layer 0", "shortcut/branch",
           "grad / shallow", "status")


def test_cli_piped_table_keeps_every_header_and_number_whole(tmp_path) -> None:
    data = _wide_table()
    res = runner.invoke(cli, ["diagnose", str(_write(tmp_path / "wide", data))])  # not a terminal
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert max(len(line) for line in lines) > 80  # wider than the 80 columns rich assumes for a pipe
    header = next(line for line in lines if "layer" in line and "status" in line)
    assert all(h in header for h in HEADERS), header
    d = diagnose(data)
    for row in d.layers.itertuples():
        cells = [f"{row.deletion_delta:.3g} [{row.deletion_lo:.3g}, {row.deletion_hi:.3g}]",
                 f"{row.angular:.3f} [{row.angular_lo:.3f}, {row.angular_hi:.3f}]",
                 f"{row.var_rel:.3g}", f"{row.ratio:.3g}", f"{row.grad_rel:.3g}", row.status]
        line = next(line for line in lines if line.startswith(f"│ {row.layer:>5} │"))
        assert all(f" {cell} " in line for cell in cells), (cells, line)
    assert "…" not in res.stdout
    verdict = next(line for line in lines if line.startswith("verdict:"))
    assert verdict.endswith(")") and "decided by deletion" in verdict  # the verdict line whole too


def _folded_cells(lines: list[str], bar: str, one_row: bool = False) -> list[list[str]]:
    """Each cell of a rich table's rows, its folded pieces joined without spaces (a row begins where the
    first column has text, unless ``one_row``: the header, aligned to its bottom)."""
    rows: list[list[str]] = []
    for line in lines:
        pieces = [p.strip() for p in line.split(bar)[1:-1]]
        if not rows or (pieces[0] and not one_row):
            rows.append(pieces)
        else:
            rows[-1] = [a + b for a, b in zip(rows[-1], pieces, strict=True)]
    return [[cell.replace(" ", "") for cell in row] for row in rows]


def test_evidence_table_folds_in_a_narrow_terminal_never_an_ellipsis() -> None:
    out = Console(width=60, force_terminal=True, color_system=None, file=io.StringIO())
    data = _wide_table()
    out.print(evidence_table(diagnose(data)))
    lines = out.file.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 60 and "…" not in "".join(lines)
    head = lines[next(i for i, line in enumerate(lines) if line.startswith("┏")) + 1:
                 next(i for i, line in enumerate(lines) if line.startswith("┡"))]
    assert len(head) > 1  # folded
    assert _folded_cells(head, "┃", one_row=True) == [[h.replace(" ", "") for h in HEADERS]]
    body = [line for line in lines if line.startswith("│")]
    d = diagnose(data)
    expected = [[str(row.layer), f"{row.deletion_delta:.3g}[{row.deletion_lo:.3g},{row.deletion_hi:.3g}]",
                 f"{row.angular:.3f}[{row.angular_lo:.3f},{row.angular_hi:.3f}]", f"{row.var_rel:.3g}",
                 f"{row.ratio:.3g}", f"{row.grad_rel:.3g}", row.status] for row in d.layers.itertuples()]
    assert _folded_cells(body, "│") == expected  # every character kept, in order
