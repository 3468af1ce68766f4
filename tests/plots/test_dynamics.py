"""Quantities over training steps on synthetic long tables: gate trajectories and loss curves."""


import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from plot_tables import all_texts, line_artists, raw_rows, silu, synthetic  # noqa: E402

from gpas_probe.plots import (  # noqa: E402
    gates,
    loss_curves,
)

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
    assert len(ax.get_lines()) == 1 and ax.get_yscale() == "log"
    raw = raw_rows(one_run, "gpas", "model", "none", "loss").sort_values("step").value.to_numpy()
    np.testing.assert_allclose(ax.get_lines()[0].get_ydata()[1:-1], (raw[:-2] + raw[1:-1] + raw[2:]) / 3)
