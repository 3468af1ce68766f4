"""``diagnose`` at its edges: a step that was not recorded, models of 1 to 4 layers (no growth fit through
two points, no shallow/deep comparison without a shallow half), a signal either used or missing, and the
correlational vote's rule in the same words wherever it is written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from diagnosis_tables import L, table, underused_table

from gpas_probe.analysis import diagnosis
from gpas_probe.analysis.diagnosis import SIGNAL_NAMES, Thresholds, diagnose, diagnose_runs

VOTE_WORDS = "at least half of the available signals and at least 2 (all of them when fewer than 2 are available)"
NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "03_diagnose_a_checkpoint.ipynb"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _training(n: int, **kw) -> pd.DataFrame:
    return table(var=4.0 ** np.arange(n), ratio=np.full(n, 30.0), grad=np.full(n, 0.1), num_layers=n, **kw)


def _profile(n: int, deletion, **kw) -> pd.DataFrame:
    return table(var=4.0 ** np.arange(n), ratio=np.full(n, 3.0), grad=np.ones(n), deletion=deletion,
                 angular=np.full(n, 0.2), half_width=0.001, num_layers=n, **kw)


# ------------------------------------------------------------------------------------------------ step


def test_a_step_without_rows_names_the_recorded_steps() -> None:
    few = pd.concat([underused_table(step=s) for s in (10, 20, 30)], ignore_index=True)
    with pytest.raises(ValueError) as e:
        diagnose(few, step=99999)
    assert str(e.value) == "step 99999 was not recorded in sick; recorded steps: 10, 20, 30"
    many = pd.concat([underused_table(step=s) for s in range(0, 301, 15)], ignore_index=True)
    with pytest.raises(ValueError) as e:
        diagnose_runs(many, step=7)
    assert str(e.value) == "step 7 was not recorded in sick; recorded steps: 0..300 (21 steps)"
    assert diagnose(many, step=150).summary["steps"]["deletion"] == 150  # a recorded step reads as before
    # a step with only model-level rows (a loss) has no evidence either, and says so
    only_loss = table("sick", 40)
    with pytest.raises(ValueError) as e:
        diagnose(pd.concat([few, only_loss], ignore_index=True), step=40)
    assert str(e.value) == "step 40 of sick has only model-level rows; steps with per-layer rows: 10, 20, 30"
    with pytest.raises(ValueError, match="^step 50 was not recorded in sick; steps with per-layer rows: 10, 20, 30$"):
        diagnose(pd.concat([few, only_loss], ignore_index=True), step=50)


# ---------------------------------------------------------------------------------------- shallow models


def test_no_growth_fit_below_three_layers() -> None:
    two = diagnose(_training(2))
    assert two.summary["growth_missing"] == "too few layers (2) to fit a growth rate"
    out = json.loads(json.dumps(two.to_dict(), allow_nan=False))["summary"]
    assert [out[k] for k in ("growth_rate", "growth_factor", "growth_intercept", "growth_r2")] == [None] * 4
    assert out["growth_missing"] == "too few layers (2) to fit a growth rate"
    three = diagnose(_training(3)).summary
    assert three["growth_missing"] is None and three["growth_factor"] == pytest.approx(4.0)
    var = np.zeros(L)
    var[[2, 5]] = [1.0, 3.0]  # eight layers, but only two with a positive variance
    sparse = diagnose(table(var=var, ratio=np.full(L, 3.0))).summary
    assert math.isnan(sparse["growth_rate"])
    assert sparse["growth_missing"] == "too few layers with a positive variance (2 of 8) to fit a growth rate"
    no_var = diagnose(table(ratio=np.full(L, 3.0))).summary
    assert no_var["growth_missing"] == "no variance recorded to fit a growth rate"


@pytest.mark.parametrize("n", [1, 2])
def test_a_training_run_under_three_layers_is_insufficient_data(n: int) -> None:
    # every correlational signal fires in every layer: with a shallow half to compare with, that is underuse
    assert diagnose(_training(3)).verdict == "underuse"
    d = diagnose(_training(n))
    reason = f"{n} layer{'s' if n > 1 else ''}: too few to compare shallow and deep layers"
    assert d.verdict == "insufficient data" and d.summary["reason"] == reason
    assert d.summary["signals_missing"]["variance"] == reason and d.summary["signals_missing"]["grad"] == reason
    assert d.summary["signals_used"] == ["ratio"] and d.summary["decided_by"] is None
    assert (d.layers["status"] == "no evidence").all() and not d.layers["underused"].any()
    assert d.layers["var_rel"].isna().all() and d.layers["grad_rel"].isna().all()


def test_causal_evidence_decides_a_two_layer_model() -> None:
    cheap = diagnose(_profile(2, deletion=[0.5, 0.001]))
    assert cheap.verdict == "underuse" and cheap.summary["decided_by"] == "deletion"
    assert cheap.summary["underused_layers"] == [1] and cheap.summary["deep_layers"] == [1]
    assert cheap.summary["reason"] is None
    costly = diagnose(_profile(2, deletion=[0.5, 0.4]))
    assert costly.verdict == "ok" and costly.summary["underused_layers"] == []
    assert set(costly.summary["signals_missing"]) == {"variance", "grad"}  # compared, so not read on 2 layers


def test_a_one_layer_profile_is_insufficient_data() -> None:
    d = diagnose(_profile(1, deletion=[0.001]))
    assert d.verdict == "insufficient data"
    assert d.summary["reason"] == "1 layer: too few to compare shallow and deep layers"


# ------------------------------------------------------------------------------------ used or missing


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("kind", ["training", "profile", "estimate profile", "no layer-0 variance"])
def test_a_signal_is_used_or_missing_never_both(n: int, kind: str) -> None:
    if kind == "training":
        data = _training(n)
    elif kind == "profile":
        data = _profile(n, deletion=np.linspace(0.5, 0.001, n))
    elif kind == "estimate profile":
        data = _profile(n, deletion=np.linspace(0.5, 0.001, n))
        data = data.assign(stat=data["stat"].replace({"deletion_delta": "deletion_estimate",
                                                      "deletion_delta_lo": "deletion_estimate_lo",
                                                      "deletion_delta_hi": "deletion_estimate_hi"}))
    else:
        data = _training(n)
        data = data[~((data["stat"] == "var") & (data["layer"] == 0))]
    for summary in (diagnose(data).summary, diagnose(data).to_dict()["summary"]):
        used, missing = summary["signals_used"], summary["signals_missing"]
        assert not set(used) & set(missing), (used, missing)
        assert set(used) | set(missing) == set(SIGNAL_NAMES)
        assert set(summary["steps"]) == set(used) == set(summary["statistics_read"])  # read only where used


# ------------------------------------------------------------------------------------------- the vote


def test_the_vote_rule_reads_the_same_everywhere() -> None:
    for available in range(7):
        # the words: the fewest signals that are at least half and at least 2; all of them below 2
        words = available if available < 2 else min(k for k in range(available + 1) if 2 * k >= available and k >= 2)
        assert Thresholds().needed(available) == words, available
    assert diagnosis.VOTE_RULE == VOTE_WORDS
    for doc in (diagnosis.__doc__, Thresholds.__doc__, Thresholds.needed.__doc__):
        assert VOTE_WORDS in _one_line(doc)
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    markdown = _one_line(" ".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown"))
    assert VOTE_WORDS in markdown
