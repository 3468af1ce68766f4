"""The README's drop-in example runs verbatim and writes a run the CLI can plot."""

from __future__ import annotations

import re
from pathlib import Path

from typer.testing import CliRunner

from gpas_probe.cli.main import app

README = Path(__file__).resolve().parents[1] / "README.md"
MARK = "<!-- drop-in example: tests/test_readme_example.py runs this block verbatim -->"


def _example() -> str:
    text = README.read_text()
    assert MARK in text, "the README lost its drop-in example"
    block = re.search(r"```python\n(.*?)```", text[text.index(MARK):], re.S)
    assert block is not None
    return block.group(1)


def test_readme_drop_in_example(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(_example(), "README.md", "exec"), scope)
    df = scope["df"]
    assert sorted(df.loc[df["stat"] == "var", "step"].unique()) == [1, 10, 20, 30, 40, 50]
    assert {"resid_post", "gpas", "params", "model"} <= set(df["site"])
    assert set(df["direction"]) == {"fwd", "bwd", "none"}
    res = CliRunner().invoke(app, ["plot", "variance", "runs/my-loop", "-o", "variance.png"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "variance.png").stat().st_size > 1000
