"""``gpas-probe diagnose``: the evidence table and verdict, JSON, exit codes, one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import typer
from diagnosis_tables import L, healthy_table, table, underused_table
from typer.testing import CliRunner

from gpas_probe.analysis.diagnosis import diagnose
from gpas_probe.cli.diagnose import diagnose_cmd
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
