"""Whole figures (``make_figure`` for every kind, one and several runs) and saving them."""


import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.collections import QuadMesh  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from plot_tables import (  # noqa: E402
    all_texts,
    colorbar_axes,
    colorbar_range,
    colorbar_ticks,
    figure_texts,
    line_artists,
    panel_axes,
    synthetic,
)

from gpas_probe.plots import (  # noqa: E402
    FIGURES,
    MissingDataError,
    compare_figure,
    loss_curves,
    make_figure,
    save_figure,
    shortcut_ratio,
)

# ---- figures ------------------------------------------------------------------------------------------

# panels per kind for the runs drawn (only 'gpas' has gates; two runs with loss add a difference panel)
PANELS = {"variance": len, "heatmap": len, "ratio": lambda runs: 2, "grad": lambda runs: 3,
          "gates": lambda runs: runs.count("gpas"), "loss": lambda runs: 1 if len(runs) == 1 else 2}


PROFILE_KINDS = {"importance", "angular", "importance-steps"}  # need profile rows: tests/plots/test_importance.py


def test_every_figure_kind_is_tested():
    assert set(FIGURES) == set(PANELS) | PROFILE_KINDS


@pytest.mark.parametrize("kind", sorted(PANELS))
@pytest.mark.parametrize("runs", [["gpas"], ["pre", "gpas"]])
def test_make_figure_every_kind_for_one_and_two_runs(two_runs, kind, runs):
    fig = make_figure(kind, two_runs, runs=runs)
    assert isinstance(fig, Figure)
    assert len(panel_axes(fig)) == PANELS[kind](runs)
    assert fig.get_suptitle() or kind == "loss"
    for cax in colorbar_axes(fig):
        assert len(colorbar_ticks(cax)) >= 2


def test_compare_figure_annotates_runs_without_data_and_shares_y(two_runs):
    no_bwd = pd.concat([synthetic(runs=("pre",), bwd=False), two_runs[two_runs.run_id == "gpas"]], ignore_index=True)
    fig = compare_figure("variance", no_bwd, direction="bwd")
    pre, gpas_ax = fig.axes[:2]
    assert line_artists(pre) == [] and "no variance of ∂L/∂resid_post recorded" in all_texts(pre)
    assert len(line_artists(gpas_ax)) == 8 and gpas_ax.get_yscale() == "log"
    assert pre.get_shared_y_axes().joined(pre, gpas_ax)
    with pytest.raises(MissingDataError):
        make_figure("variance", synthetic(runs=("pre",), bwd=False), direction="bwd")


def test_variance_figure_says_how_many_steps_it_draws_beside_each_panel():
    data = synthetic(runs=("a", "b"), n_layers=3, steps=tuple(range(0, 210, 10)))
    fig = make_figure("variance", data)
    fig.canvas.draw()
    for ax in panel_axes(fig):
        legend = ax.get_legend()
        assert legend.get_title().get_text() == "step (8 of 21 recorded)"
        assert [t.get_text() for t in legend.get_texts()] == [ln.get_label() for ln in line_artists(ax)]
        assert legend.get_window_extent().x0 >= ax.get_window_extent().x1


# ---- gates --------------------------------------------------------------------------------------------


def test_gates_figure_leaves_runs_without_gates_out_and_names_them(two_runs):
    fig = make_figure("gates", two_runs)
    (panel,) = panel_axes(fig)
    assert panel.get_title() == "gpas" and len(line_artists(panel)) == 6
    assert "left out, no GPAS gates: pre" in figure_texts(fig)
    fig.canvas.draw()  # the note sits under the panel, clear of its tick labels
    note = [t for t in fig.texts if "left out" in t.get_text()][0].get_window_extent()
    assert note.y1 <= panel.get_tightbbox().y0
    with pytest.raises(MissingDataError, match=r"^no GPAS gates in pre: train with --gpas$"):
        make_figure("gates", two_runs, runs=["pre"])
    both = make_figure("gates", synthetic(runs=("g1", "g2"), gated=("g1", "g2")))
    assert len(panel_axes(both)) == 2 and "left out" not in figure_texts(both)


def test_gates_figure_gives_each_run_its_own_layer_scale():
    data = pd.concat([synthetic(runs=("deep",), n_layers=24, gated=("deep",), steps=(0, 50, 100)),
                      synthetic(runs=("shallow",), n_layers=4, gated=("shallow",), steps=(0, 50, 100))],
                     ignore_index=True)
    fig = make_figure("gates", data)
    deep, shallow = panel_axes(fig)
    bars = colorbar_axes(fig)
    assert len(bars) == 2  # one per panel
    assert sorted(colorbar_range(c) for c in bars) == [(0.0, 3.0), (0.0, 23.0)]
    for cax in bars:
        ticks = colorbar_ticks(cax)
        assert len(ticks) >= 2 and all(t == int(t) for t in ticks)
    # the deepest layer of each run takes the end of the palette, the first layer its start
    deep_lines, shallow_lines = line_artists(deep), line_artists(shallow)
    assert len(deep_lines) == 24 and len(shallow_lines) == 4
    assert deep_lines[-1].get_color() == shallow_lines[-1].get_color()
    assert deep_lines[0].get_color() == shallow_lines[0].get_color()
    assert len({ln.get_color() for ln in shallow_lines}) == 4


# ---- loss ---------------------------------------------------------------------------------------------


def _loss_runs(n_steps: int = 300) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    steps = np.arange(1, n_steps + 1)
    return pd.DataFrame([("a" if r == 0 else "b", int(s), -1, "model", "none", "loss", float(v))
                         for r in range(2) for s, v in zip(steps, 3 + 5 / steps - 0.02 * r
                                                           + rng.normal(0, 0.1, n_steps), strict=True)],
                        columns=["run_id", "step", "layer", "site", "direction", "stat", "value"])


def test_loss_figure_smooths_and_adds_a_difference_panel_for_two_runs():
    data = _loss_runs()
    fig = make_figure("loss", data)
    top, bottom = panel_axes(fig)
    faint = [ln for ln in top.get_lines() if (ln.get_alpha() or 1) < 1]
    solid = [ln for ln in top.get_lines() if ln not in faint]
    assert [ln.get_label() for ln in solid] == ["a", "b"] and len(faint) == 2
    window = int(top.get_ylabel().split("rolling mean of ")[1].split()[0])
    assert 1 < window < 300 / 10  # light smoothing, stated on the axis
    for ln in solid:
        raw = data[data.run_id == ln.get_label()].sort_values("step").value
        np.testing.assert_allclose(ln.get_ydata(), raw.rolling(window, center=True, min_periods=1).mean())
    zero = [ln for ln in bottom.get_lines() if list(ln.get_ydata()) == [0, 0]]
    (diff,) = [ln for ln in bottom.get_lines() if ln not in zero]
    assert len(zero) == 1 and diff.get_label() == "b"
    np.testing.assert_allclose(diff.get_ydata(), solid[1].get_ydata() - solid[0].get_ydata())
    assert "loss of a" in bottom.get_ylabel()
    assert bottom.get_shared_x_axes().joined(top, bottom)


def test_loss_figure_of_one_run_has_no_difference_panel_and_short_curves_stay_raw():
    fig = make_figure("loss", synthetic(runs=("gpas",), steps=tuple(range(0, 80, 10))))
    (ax,) = panel_axes(fig)
    assert len(line_artists(ax)) == 1 and "rolling mean" not in ax.get_ylabel()  # 8 points: no smoothing
    fig = make_figure("loss", _loss_runs(), runs=["b"])
    assert len(panel_axes(fig)) == 1
    fig = make_figure("loss", _loss_runs(), smooth=1)
    assert all((ln.get_alpha() or 1) == 1 for ln in panel_axes(fig)[0].get_lines())


# ---- heatmap ------------------------------------------------------------------------------------------


def test_heatmap_figure_of_one_step_says_which_figure_to_draw():
    one = synthetic(runs=("p",), steps=(40,))
    with pytest.raises(MissingDataError, match="one step only.*variance figure"):
        make_figure("heatmap", one)
    mixed = pd.concat([one, synthetic(runs=("q",))], ignore_index=True)
    fig = make_figure("heatmap", mixed)
    p, q = panel_axes(fig)
    assert "one step only" in all_texts(p) and not [c for c in p.collections if isinstance(c, QuadMesh)]
    assert len([c for c in q.collections if isinstance(c, QuadMesh)]) == 1


def test_heatmap_figure_of_constant_values_has_a_colour_range():
    flat = synthetic(runs=("p",), steps=(0, 10))
    flat = flat.assign(value=np.where(flat.stat == "var", 2.0, flat.value))
    (cax,) = colorbar_axes(make_figure("heatmap", flat))
    lo, hi = colorbar_range(cax)
    assert lo < np.log10(2.0) < hi and len(colorbar_ticks(cax)) >= 2


def test_make_figure_rejects_unknown_kind_and_runs(two_runs):
    with pytest.raises(ValueError, match="unknown figure kind"):
        make_figure("pie", two_runs)
    with pytest.raises(ValueError, match="not in the data"):
        make_figure("loss", two_runs, runs=["nope"])


def test_many_runs_wrap_into_rows():
    data = synthetic(runs=("a", "b", "c", "d"), n_layers=3, steps=(0, 10))
    fig = make_figure("variance", data)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == 4 and len(fig.axes) == 6


# ---- saving -------------------------------------------------------------------------------------------


def test_save_figure_by_suffix(tmp_path, one_run):
    fig = make_figure("loss", one_run)
    magic = {"png": b"\x89PNG", "svg": b"<?xml", "pdf": b"%PDF"}
    for suffix, head in magic.items():
        path = save_figure(fig, tmp_path / "sub" / f"loss.{suffix}")
        assert path.read_bytes()[:len(head)] == head and path.stat().st_size > 1000
    with pytest.raises(ValueError, match=r"'\.txt'"):
        save_figure(fig, tmp_path / "loss.txt")
    assert not (tmp_path / "loss.txt").exists()


def test_comparison_views_raise_when_no_run_has_the_rows(two_runs):
    no_ratio = two_runs[~two_runs.stat.isin(["shortcut_branch_ratio", "shortcut_branch_cos"])]
    with pytest.raises(MissingDataError, match="shortcut_branch_ratio"):
        shortcut_ratio(no_ratio, ax=plt.figure().gca())
    with pytest.raises(MissingDataError, match="shortcut_branch_ratio"):
        make_figure("ratio", no_ratio)
    no_loss = two_runs[two_runs.site != "model"]
    with pytest.raises(MissingDataError, match="loss"):
        loss_curves(no_loss, ax=plt.figure().gca())
    ax = loss_curves(pd.concat([no_loss[no_loss.run_id == "pre"], two_runs[two_runs.run_id == "gpas"]]),
                     ax=plt.figure().gca())
    assert [ln.get_label() for ln in line_artists(ax)] == ["gpas"] and "no loss: pre" in all_texts(ax)


def test_grad_figure_notes_a_run_without_backward_stats(two_runs):
    mixed = pd.concat([synthetic(runs=("pre",), bwd=False), two_runs[two_runs.run_id == "gpas"]], ignore_index=True)
    fig = make_figure("grad", mixed)
    fwd, bwd, params = fig.axes[:3]
    assert len(line_artists(fwd)) == 2 and len(line_artists(params)) == 2
    assert [ln.get_label() for ln in line_artists(bwd)] == ["gpas"] and "pre" in all_texts(bwd)
    with pytest.raises(MissingDataError, match="no run has"):
        make_figure("grad", two_runs[~two_runs.stat.isin(["rms", "grad_norm"])])
