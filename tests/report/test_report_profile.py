"""`gpas-probe report` of profiles: the profile's metadata (checkpoints, evaluation data), the verdict
``diagnose`` prints from causal evidence, the importance and angular figures, and importance over training
only for a profile of several checkpoints (else a note saying why it is left out)."""

from __future__ import annotations

import shlex

from typer.testing import CliRunner

from gpas_probe.cli.main import app

runner = CliRunner()


def _ok(args: list[object]) -> str:
    res = runner.invoke(app, [str(a) for a in args], terminal_width=200)
    assert res.exit_code == 0, res.output
    return res.output


def test_a_profile_of_one_checkpoint(made, tmp_path, read_page) -> None:
    profile = made.profiles / "pre"
    out = tmp_path / "profile.html"
    _ok(["report", profile, "-o", out])
    page = read_page(out)
    assert list(page.sections) == ["runs", "diagnosis", "figures", "commands"]
    runs = page.sections["runs"]
    for fact in ("profile", "1 (steps 4) of", str(made.pre), "evaluation data", "1 batch(es) of", "importance"):
        assert fact in runs, fact
    assert "training run" not in runs
    printed = _ok(["diagnose", profile]).splitlines()
    assert page.summaries == [line for line in printed if line.startswith("verdict:")]
    assert "decided by deletion" in page.summaries[0]  # a profile's causal evidence decides
    assert page.figures == ["importance", "angular"]
    assert sum(src.startswith("data:image/png;base64,") for src in page.attr_values("src")) == 2
    left_out = page.sections["figures"]
    assert "importance-steps: each profile holds one checkpoint step" in left_out
    assert shlex.join(["gpas-probe", "plot", "angular", str(profile), "-o", "angular.png"]) in page.commands


def test_a_profile_of_several_checkpoints_shows_importance_over_training(made, tmp_path, read_page) -> None:
    out = tmp_path / "steps.html"
    _ok(["report", made.profiles / "gpas", "-o", out])
    page = read_page(out)
    assert page.figures == ["importance", "angular", "importance-steps"]
    assert "2 (steps 2, 4) of" in page.sections["runs"]
    assert "Left out" not in page.sections["figures"]


def test_an_output_folder_of_several_profiles_is_refused_with_their_names(made, tmp_path) -> None:
    res = runner.invoke(app, ["report", str(made.profiles), "-o", str(tmp_path / "r.html")])
    assert res.exit_code == 2 and "error:" in res.output and "holds 2 runs" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "r.html").exists()
