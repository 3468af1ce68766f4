"""The README's Python examples run: the drop-in example verbatim, writing a run the CLI can plot; the API
example with its 300 steps cut to 3, writing probes and a checkpoint that loads; the profile example
with the demo's folder replaced by a tiny run's."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from helpers import assert_figure_file, write_corpus
from typer.testing import CliRunner

from gpas_probe import ModelConfig, TrainConfig, train
from gpas_probe.cli.main import app
from gpas_probe.profile import PROFILE_FILE
from gpas_probe.store import load_run

README = Path(__file__).resolve().parents[1] / "README.md"
MARK = "<!-- drop-in example: tests/test_readme_example.py runs this block verbatim -->"
API_MARK = ("<!-- python-api example: tests/test_readme_example.py runs this block with steps=300 replaced by "
            "steps=3 -->")
PROFILE_MARK = "From Python, the options are one `ProfileConfig`"


def _block(mark: str) -> str:
    text = README.read_text()
    assert mark in text, "the README lost an example"
    block = re.search(r"```python\n(.*?)```", text[text.index(mark):], re.S)
    assert block is not None
    return block.group(1)


def test_readme_drop_in_example(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(_block(MARK), "README.md", "exec"), scope)
    df = scope["df"]
    assert sorted(df.loc[df["stat"] == "var", "step"].unique()) == [1, 10, 20, 30, 40, 50]
    assert {"resid_post", "gpas", "params", "model"} <= set(df["site"])
    assert set(df["direction"]) == {"fwd", "bwd", "none"}
    res = CliRunner().invoke(app, ["plot", "variance", "runs/my-loop", "-o", "variance.png"])
    assert res.exit_code == 0, res.output
    assert_figure_file(tmp_path / "variance.png", "variance", load_run("runs/my-loop"))


def test_readme_python_api_example(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = _block(API_MARK)
    assert code.count("steps=300") == 1
    scope: dict = {}
    exec(compile(code.replace("steps=300", "steps=3"), "README.md", "exec"), scope)
    assert scope["logits"].shape == (2, 64, scope["config"].vocab_size) and torch.isfinite(scope["logits"]).all()
    assert scope["ckpt"].step == 3 and scope["ckpt"].path.name == "step_000003"
    assert sorted(load_run("runs/api").query("stat == 'var'")["step"].unique()) == [1]


def test_readme_profile_example(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    corpus = write_corpus(tmp_path, seed=2, words=3000)
    tc = TrainConfig.from_preset("tiny", steps=2, data=str(corpus))
    train(ModelConfig.from_preset("tiny", gpas=True), tc, Path("runs/demo/pre-gpas"))
    corpus.rename("notes.txt")
    scope: dict = {}
    exec(compile(_block(PROFILE_MARK), "README.md", "exec"), scope)
    folder = scope["folder"]
    assert folder == Path("profiles/notes/pre-gpas") and (folder / PROFILE_FILE).is_file()
    df = load_run(folder)
    assert set(df["step"]) == {2} and {"deletion_delta", "var", "val_loss"} <= set(df["stat"])


def test_readme_drop_in_example_run_twice_refuses_then_appends_without_duplicates(tmp_path, monkeypatch):
    """Run again into the same folder, the example is refused (it used to append a second copy of every
    row); with if_exists='append' the steps it records again replace theirs, each key once; with
    'overwrite' only the new rows remain. The loss is passed undetached: no warning."""
    import warnings

    import pandas as pd

    from gpas_probe.store import KEY_COLUMNS

    monkeypatch.chdir(tmp_path)
    code = _block(MARK)
    exec(compile(code, "README.md", "exec"), {})
    first = pd.read_parquet("runs/my-loop/probes")  # plain pandas: what is on disk
    with pytest.raises(FileExistsError, match="already holds probe rows .* if_exists='append'"):
        exec(compile(code, "README.md", "exec"), {})
    pd.testing.assert_frame_equal(pd.read_parquet("runs/my-loop/probes"), first)  # the refusal changed nothing

    appended = code.replace("every=10, optimizer=optimizer)", "every=10, optimizer=optimizer, if_exists='append')")
    appended = appended.replace("range(1, 51)", "range(31, 61)")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an undetached loss used to warn on every step
        exec(compile(appended, "README.md", "exec"), {})
    both = pd.read_parquet("runs/my-loop/probes")
    assert not both.duplicated(KEY_COLUMNS).any()
    assert sorted(both.loc[both["stat"] == "var", "step"].unique()) == [1, 10, 20, 30, 31, 40, 50, 60]
    kept = both[both["step"] <= 30].sort_values(KEY_COLUMNS).reset_index(drop=True)
    pd.testing.assert_frame_equal(kept, first[first["step"] <= 30].sort_values(KEY_COLUMNS).reset_index(drop=True))

    overwritten = code.replace("every=10, optimizer=optimizer)",
                               "every=10, optimizer=optimizer, if_exists='overwrite')")
    exec(compile(overwritten.replace("range(1, 51)", "range(1, 6)"), "README.md", "exec"), {})
    assert sorted(pd.read_parquet("runs/my-loop/probes")["step"].unique()) == [1, 2, 3, 4, 5]
