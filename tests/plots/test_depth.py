"""Depth profiles on synthetic long tables: variance growth, the layer x step heatmap, shortcut/branch ratios
and gradient norms draw one artist per promised line, log axes where promised, and values equal to a direct
reduction of the raw rows."""


import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.collections import PolyCollection, QuadMesh  # noqa: E402
from plot_tables import all_texts, line_artists, raw_rows, synthetic  # noqa: E402

from gpas_probe.plots import (  # noqa: E402
    MissingDataError,
    gates,
    grad_norm,
    shortcut_ratio,
    variance_growth,
    variance_heatmap,
)

# ---- variance growth -------------------------------------------------------------------------------------


def test_variance_growth_subsamples_steps_and_plots_the_raw_values(two_runs):
    fig, ax = plt.subplots()
    out = variance_growth(two_runs, ax=ax, run="pre", max_steps=5)
    assert out is ax and ax.get_yscale() == "log"
    lines = line_artists(ax)
    assert len(lines) == 5
    labels = [ln.get_label() for ln in lines]
    assert labels[0] == "0" and labels[-1] == "110"  # first and last recorded step always included
    raw = raw_rows(two_runs, "pre", "resid_post", "fwd", "var")
    for ln in lines:
        step = int(ln.get_label().replace(",", ""))
        ref = raw[raw.step == step].sort_values("layer")
        np.testing.assert_array_equal(ln.get_xdata(), ref.layer.to_numpy())
        np.testing.assert_allclose(ln.get_ydata(), ref.value.to_numpy())
    assert ax.get_legend() is not None and ax.get_legend().get_title().get_text() == "step (5 of 12 recorded)"
    assert ax.get_title() == "pre"


def test_variance_growth_legend_names_every_drawn_step_outside_the_axes(one_run):
    recorded = sorted(one_run.step.unique())
    for kwargs, drawn in (({}, 8), ({"max_steps": 20}, len(recorded)), ({"steps": [20, 30]}, 2)):
        fig, ax = plt.subplots(layout="constrained")
        variance_growth(one_run, ax=ax, **kwargs)
        legend = ax.get_legend()
        assert [t.get_text() for t in legend.get_texts()] == [ln.get_label() for ln in line_artists(ax)]
        assert len(legend.get_texts()) == drawn
        title = legend.get_title().get_text()
        assert title == (f"step (all {drawn} recorded)" if drawn == len(recorded)
                         else f"step ({drawn} of {len(recorded)} recorded)")
        fig.canvas.draw()
        box, frame = legend.get_window_extent(), ax.get_window_extent()
        assert box.x0 >= frame.x1  # right of the Axes: it hides no line
        plt.close(fig)


def test_variance_growth_all_steps_when_few_and_explicit_steps(one_run):
    ax = variance_growth(one_run, ax=plt.figure().gca(), max_steps=20)  # single run: run= optional
    assert len(line_artists(ax)) == 12
    ax = variance_growth(one_run, ax=plt.figure().gca(), steps=[50, 10], site="attn_out", direction="bwd")
    assert [ln.get_label() for ln in line_artists(ax)] == ["10", "50"]
    assert "∂L/∂attn_out" in ax.get_ylabel() and "log" in ax.get_ylabel()
    with pytest.raises(MissingDataError, match=r"\[55\]"):
        variance_growth(one_run, ax=plt.figure().gca(), steps=[55])


def test_variance_growth_rejects_ambiguous_or_missing(two_runs):
    with pytest.raises(ValueError, match="pass run="):
        variance_growth(two_runs, ax=plt.figure().gca())
    no_bwd = synthetic(runs=("pre",), bwd=False)
    with pytest.raises(MissingDataError, match="'bwd'"):
        variance_growth(no_bwd, ax=plt.figure().gca(), direction="bwd")
    with pytest.raises(ValueError, match="missing columns"):
        variance_growth(two_runs.drop(columns="stat"), run="pre")
    with pytest.raises(ValueError, match="no rows"):
        variance_growth(two_runs.iloc[:0], run="pre")


def test_categorical_columns_give_the_same_lines(two_runs):
    cat = synthetic(categorical=True)
    a = variance_growth(two_runs, ax=plt.figure().gca(), run="gpas")
    b = variance_growth(cat, ax=plt.figure().gca(), run="gpas")
    for la, lb in zip(line_artists(a), line_artists(b), strict=True):
        np.testing.assert_array_equal(la.get_ydata(), lb.get_ydata())
    assert len(line_artists(shortcut_ratio(cat, ax=plt.figure().gca()))) == 4
    assert len(line_artists(gates(cat, ax=plt.figure().gca(), run="gpas"))) == 6


# ---- heatmap ------------------------------------------------------------------------------------------


def test_heatmap_holds_log10_of_every_layer_and_step(two_runs):
    ax = variance_heatmap(two_runs, ax=plt.figure().gca(), run="gpas")
    mesh = [c for c in ax.collections if isinstance(c, QuadMesh)]
    assert len(mesh) == 1
    raw = raw_rows(two_runs, "gpas", "resid_post", "fwd", "var")
    ref = np.log10(raw.pivot(index="layer", columns="step", values="value").to_numpy())
    np.testing.assert_allclose(np.asarray(mesh[0].get_array()).reshape(ref.shape), ref)
    lo, hi = ax.get_ylim()
    assert lo < hi  # row 0 (layer 0) at the bottom
    assert ax.get_xlabel() == "training step" and ax.get_ylabel() == "layer"
    assert ax.get_xscale() == "linear"  # evenly spaced steps
    edges = mesh[0].get_coordinates()[0, :, 0]
    steps = np.sort(raw.step.unique()).astype(float)
    np.testing.assert_allclose(edges[1:-1], (steps[1:] + steps[:-1]) / 2)  # halfway between recorded steps
    assert edges[0] < steps[0] and edges[-1] > steps[-1]


LOG_STEPS = (1, 2, 3, 6, 10, 18, 25, 32, 50, 56, 75, 100, 125, 150, 175, 200, 225, 250, 275, 300)


def test_heatmap_of_log_spaced_steps_is_drawn_on_a_log_step_axis():
    data = synthetic(runs=("r",), steps=LOG_STEPS)
    ax = variance_heatmap(data, ax=plt.figure().gca())
    assert ax.get_xscale() == "log" and "log scale" in ax.get_xlabel()
    mesh = [c for c in ax.collections if isinstance(c, QuadMesh)][0]
    edges = mesh.get_coordinates()[0, :, 0]
    logs = np.log10(np.array(LOG_STEPS, dtype=float))
    assert len(edges) == len(LOG_STEPS) + 1
    np.testing.assert_allclose(np.log10(edges[1:-1]), (logs[1:] + logs[:-1]) / 2)  # halfway in log space
    assert all(lo < s < hi for lo, s, hi in zip(edges[:-1], LOG_STEPS, edges[1:], strict=True))
    assert ax.get_xlim() == pytest.approx((edges[0], edges[-1]))
    # step 0 cannot sit on a log axis: symmetric-log, linear up to the first positive step
    ax = variance_heatmap(synthetic(runs=("r",), steps=(0, *LOG_STEPS)), ax=plt.figure().gca())
    assert ax.get_xscale() == "symlog"
    edges = [c for c in ax.collections if isinstance(c, QuadMesh)][0].get_coordinates()[0, :, 0]
    assert all(lo < s < hi for lo, s, hi in zip(edges[:-1], (0, *LOG_STEPS), edges[1:], strict=True))


def test_heatmap_of_one_step_points_to_the_variance_figure():
    with pytest.raises(MissingDataError, match="one step only.*variance figure"):
        variance_heatmap(synthetic(runs=("r",), steps=(40,)), ax=plt.figure().gca())


def test_heatmap_rows_are_the_layers_drawn():
    data = synthetic(runs=("r",))
    data = data[data.layer.isin([-1, 1, 4])]
    ax = variance_heatmap(data, ax=plt.figure().gca())
    mesh = [c for c in ax.collections if isinstance(c, QuadMesh)][0]
    assert mesh.get_coordinates().shape[0] == 3  # two rows of cells
    assert [t.get_text() for t in ax.get_yticklabels()] == ["1", "4"]


# ---- shortcut ratio -----------------------------------------------------------------------------------


def test_shortcut_ratio_one_line_per_run_and_sublayer_at_last_step(two_runs, one_run):
    ax = shortcut_ratio(two_runs, ax=plt.figure().gca())
    assert ax.get_yscale() == "log"
    lines = line_artists(ax)
    assert sorted(ln.get_label() for ln in lines) == ["gpas · attn", "gpas · mlp", "pre · attn", "pre · mlp"]
    for ln in lines:
        run, site = ln.get_label().split(" · ")
        raw = raw_rows(two_runs, run, site, "fwd", "shortcut_branch_ratio")
        ref = raw[raw.step == raw.step.max()].sort_values("layer")
        np.testing.assert_allclose(ln.get_ydata(), ref.value.to_numpy())
    assert "step 110" in ax.get_title()
    assert len(line_artists(shortcut_ratio(one_run, ax=plt.figure().gca()))) == 2
    ax = shortcut_ratio(two_runs, ax=plt.figure().gca(), stat="shortcut_branch_cos", step=30)
    assert ax.get_yscale() == "linear" and "step 30" in ax.get_title()


# ---- gradient norms -----------------------------------------------------------------------------------


@pytest.mark.parametrize("view, site, direction, stat", [("params", "params", "none", "grad_norm"),
                                                         ("bwd", "resid_post", "bwd", "rms"),
                                                         ("fwd", "resid_post", "fwd", "rms")])
def test_grad_norm_views_average_the_last_steps(two_runs, view, site, direction, stat):
    ax = grad_norm(two_runs, ax=plt.figure().gca(), view=view, last=3)
    assert ax.get_yscale() == "log"
    lines = line_artists(ax)
    assert [ln.get_label() for ln in lines] == ["pre", "gpas"]
    for ln in lines:
        raw = raw_rows(two_runs, ln.get_label(), site, direction, stat)
        ref = raw[raw.step >= 90].groupby("layer").value.mean()
        np.testing.assert_allclose(ln.get_ydata(), ref.to_numpy())
    assert "90–110" in ax.get_title()


def test_grad_norm_at_a_chosen_step(two_runs):
    ax = grad_norm(two_runs, ax=plt.figure().gca(), view="params", step=30)
    for ln in line_artists(ax):
        raw = raw_rows(two_runs, ln.get_label(), "params", "none", "grad_norm")
        np.testing.assert_allclose(ln.get_ydata(), raw[raw.step == 30].sort_values("layer").value.to_numpy())
    assert "step 30" in ax.get_title()
    with pytest.raises(MissingDataError, match="at step 35"):
        grad_norm(two_runs, ax=plt.figure().gca(), step=35)


def test_grad_norm_names_runs_without_data_and_errors_when_none_has_it():
    mixed = pd.concat([synthetic(runs=("pre",), bwd=False), synthetic(runs=("gpas",))], ignore_index=True)
    ax = grad_norm(mixed, ax=plt.figure().gca(), view="bwd")
    assert [ln.get_label() for ln in line_artists(ax)] == ["gpas"]
    assert "pre" in all_texts(ax)
    with pytest.raises(MissingDataError, match="∂L/∂resid_post"):
        grad_norm(synthetic(runs=("pre",), bwd=False), ax=plt.figure().gca(), view="bwd")
    with pytest.raises(ValueError, match="view must be"):
        grad_norm(mixed, view="sideways")


def test_intervals_recorded_by_a_profile_are_drawn_as_bands():
    layers = np.arange(4)
    value = 1.0 + layers
    parts = []
    for stat, site, offset in (("var_robust", "resid_post", 0.0), ("shortcut_branch_ratio_robust", "attn", 1.0)):
        for suffix, shift in (("", 0.0), ("_lo", -0.5), ("_hi", 0.5)):
            parts.append(pd.DataFrame({"run_id": "p", "step": 5, "layer": layers, "site": site, "direction": "fwd",
                                       "stat": stat + suffix, "value": value + offset + shift}))
    data = pd.concat(parts, ignore_index=True)
    for ax, offset in ((variance_growth(data, ax=plt.figure().gca(), stat="var_robust"), 0.0),
                       (shortcut_ratio(data, ax=plt.figure().gca(), stat="shortcut_branch_ratio_robust",
                                       sites=("attn",)), 1.0)):
        bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
        assert len(bands) == 1
        ys = bands[0].get_paths()[0].vertices[:, 1]
        want = set(value + offset - 0.5) | set(value + offset + 0.5)
        np.testing.assert_allclose(sorted(set(np.round(ys, 9))), sorted(want))
    # no bounds recorded: no band
    plain = data[~data["stat"].str.endswith(("_lo", "_hi"))]
    ax = variance_growth(plain, ax=plt.figure().gca(), stat="var_robust")
    assert not [c for c in ax.collections if isinstance(c, PolyCollection)]
