"""Quantities over training steps on synthetic long tables: gate trajectories and loss curves."""


import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from plot_tables import all_texts, line_artists, raw_rows, silu, synthetic  # noqa: E402

from gpas_probe.plots import (  # noqa: E402
    MissingDataError,
    gates,
    loss_curves,
    loss_differences,
)
from gpas_probe.plots.dynamics import smooth_window  # noqa: E402

# ---- gates --------------------------------------------------------------------------------------------


def test_gates_one_line_per_layer_scale_trajectory(two_runs):
    ax = gates(two_runs, ax=plt.figure().gca(), run="gpas")
    lines = line_artists(ax)
    assert len(lines) == 6
    raw = raw_rows(two_runs, "gpas", "gpas", "none", "alpha")
    for layer, ln in enumerate(lines):
        a = raw[raw.layer == layer].sort_values("step")
        np.testing.assert_allclose(ln.get_ydata(), 1 - silu(a.value.to_numpy()))
        np.testing.assert_array_equal(ln.get_xdata(), a.step.to_numpy())
    assert len({ln.get_color() for ln in lines}) == 6  # a colour per layer
    assert len(ax.figure.axes) == 2  # plus the layer colorbar


def test_gates_without_gates_says_so(two_runs):
    ax = gates(two_runs, ax=plt.figure().gca(), run="pre")
    assert line_artists(ax) == [] and "no GPAS gates in this run" in all_texts(ax)


def test_gates_per_sublayer_and_scale_derived_from_alpha():
    data = synthetic(runs=("gpas",), gate_sites=("gpas_attn", "gpas_mlp"), record_scale=False)
    ax = gates(data, ax=plt.figure().gca())
    lines = line_artists(ax)
    assert len(lines) == 12
    assert {ln.get_linestyle() for ln in lines} == {"-", "--"}
    raw = raw_rows(data, "gpas", "gpas_mlp", "none", "alpha")
    ref = raw[raw.layer == 5].sort_values("step")
    np.testing.assert_allclose(lines[-1].get_ydata(), 1 - silu(ref.value.to_numpy()))
    ax = gates(data, ax=plt.figure().gca(), stat="alpha_grad")
    assert len(line_artists(ax)) == 12 and "∂L/∂α" in ax.get_ylabel()


def test_gates_of_one_step_are_markers():
    ax = gates(synthetic(runs=("gpas",), steps=(40,)), ax=plt.figure().gca())
    assert len(ax.get_lines()) == 6 and all(ln.get_marker() == "o" for ln in ax.get_lines())


# ---- loss ---------------------------------------------------------------------------------------------


def test_loss_curves_line_per_run_val_as_markers(two_runs, one_run):
    ax = loss_curves(two_runs, ax=plt.figure().gca())
    solid = line_artists(ax)
    markers = [ln for ln in ax.get_lines() if ln not in solid]
    assert [ln.get_label() for ln in solid] == ["pre", "gpas"]
    assert [ln.get_label() for ln in markers] == ["pre (val)", "gpas (val)"]
    raw = raw_rows(two_runs, "gpas", "model", "none", "val_loss").sort_values("step")
    np.testing.assert_allclose(markers[1].get_ydata(), raw.value.to_numpy())
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "pre" in legend and "gpas (val)" in legend
    ax = loss_curves(one_run, ax=plt.figure().gca(), val=False, smooth=3, logy=True)
    faint, solid = ax.get_lines()  # the raw curve faint under the rolling mean
    assert ax.get_yscale() == "log"
    raw = raw_rows(one_run, "gpas", "model", "none", "loss").sort_values("step").value.to_numpy()
    np.testing.assert_allclose(faint.get_ydata(), raw)
    np.testing.assert_allclose(solid.get_ydata()[1:-1], (raw[:-2] + raw[1:-1] + raw[2:]) / 3)
    assert faint.get_alpha() < 0.5 and solid.get_alpha() in (None, 1.0)
    assert faint.get_linewidth() < solid.get_linewidth()
    assert "rolling mean of 3 points" in ax.get_ylabel()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["gpas"]  # the raw curve is not in the legend


def test_smoothing_window_grows_slowly_with_the_number_of_points():
    windows = [smooth_window(n) for n in range(0, 20001, 7)]
    assert all(w % 2 == 1 for w in windows)  # centred: odd
    assert windows == sorted(windows)
    assert [smooth_window(n) for n in range(9)] == [1] * 9  # short curves stay raw
    assert all(smooth_window(n) <= max(3, 0.1 * n) for n in range(1, 20001, 7))  # light: a tenth of longer curves


def test_loss_of_one_point_is_a_labelled_marker_with_a_readable_range():
    data = synthetic(runs=("gpas",), steps=(40,))
    ax = loss_curves(data, ax=plt.figure().gca(), val=False)
    (point,) = ax.get_lines()
    value = raw_rows(data, "gpas", "model", "none", "loss").value.item()
    assert point.get_marker() == "o" and point.get_linestyle() == "None"
    assert f"{value:.4g}" in all_texts(ax) and "step 40" in all_texts(ax)
    lo, hi = ax.get_ylim()
    assert lo < value < hi and hi - lo <= 0.25 * abs(value)  # around the value, not around 0
    left, right = ax.get_xlim()
    assert left < 40 < right and right - left <= 10


def test_loss_differences_are_smoothed_differences_from_the_first_run():
    data = synthetic(runs=("a", "b", "c"))
    ax = loss_differences(data, ax=plt.figure().gca(), smooth=3)
    zero = [ln for ln in ax.get_lines() if list(ln.get_ydata()) == [0, 0]]
    assert len(zero) == 1 and zero[0].get_label() == "a (reference)"
    curves = [ln for ln in ax.get_lines() if ln not in zero]
    assert [ln.get_label() for ln in curves] == ["b", "c"]

    def rolled(run):
        raw = raw_rows(data, run, "model", "none", "loss").sort_values("step").value
        return raw.rolling(3, center=True, min_periods=1).mean().to_numpy()

    for ln in curves:
        np.testing.assert_allclose(ln.get_ydata(), rolled(ln.get_label()) - rolled("a"))
    assert "loss of a" in ax.get_ylabel() and "rolling mean of 3" in ax.get_ylabel()
    with pytest.raises(MissingDataError, match="two runs"):
        loss_differences(data[data.run_id == "a"], ax=plt.figure().gca())


def test_loss_differences_read_the_reference_between_its_steps():
    a = synthetic(runs=("a",), steps=(0, 20, 40, 60))
    b = synthetic(runs=("b",), steps=(10, 30, 50, 70))
    ax = loss_differences(pd.concat([a, b], ignore_index=True), ax=plt.figure().gca())
    curve = [ln for ln in ax.get_lines() if ln.get_label() == "b"][0]
    ref = raw_rows(a, "a", "model", "none", "loss").sort_values("step")
    mine = raw_rows(b, "b", "model", "none", "loss").sort_values("step")
    inside = mine[mine.step <= 60]  # step 70 is past the reference's last step
    np.testing.assert_array_equal(curve.get_xdata(), inside.step.to_numpy())
    np.testing.assert_allclose(curve.get_ydata(), inside.value.to_numpy()
                               - np.interp(inside.step, ref.step, ref.value))
