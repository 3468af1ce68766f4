"""make_figure's selection keywords (step, site, stat, layers): each kind takes the ones that apply and draws
what they select, refuses the others in one line, and names what was recorded when a value was not."""

from __future__ import annotations

import re

import matplotlib

matplotlib.use("Agg")

import inspect  # noqa: E402

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.collections import QuadMesh  # noqa: E402
from plot_tables import line_artists, panel_axes, profile_table, raw_rows, synthetic  # noqa: E402

from gpas_probe.plots import FIGURE_OPTIONS, FIGURES, make_figure  # noqa: E402
from gpas_probe.plots.selection import keep_layers  # noqa: E402

NAMES = ("step", "site", "stat", "layers")
SAMPLE = {"step": 10, "site": "resid_post", "stat": "var", "layers": [0]}


@pytest.fixture(scope="module")
def data() -> pd.DataFrame:
    return pd.concat([synthetic(), profile_table(runs=("prof",))], ignore_index=True)


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


def _mesh(ax):
    meshes = [c for c in ax.collections if isinstance(c, QuadMesh)]
    assert len(meshes) == 1
    return meshes[0]


def test_make_figure_takes_the_four_keywords_and_documents_them():
    params = inspect.signature(make_figure).parameters
    assert list(params)[:3] == ["kind", "data", "runs"]
    for name in NAMES:
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY and params[name].default is None
        assert f"``{name}``" in make_figure.__doc__
    assert set(FIGURE_OPTIONS) == set(FIGURES)


@pytest.mark.parametrize("kind", sorted(FIGURES))
def test_a_keyword_that_does_not_apply_is_one_line(data, kind):
    for name in NAMES:
        if name in FIGURE_OPTIONS[kind]:
            continue
        with pytest.raises(ValueError) as err:
            make_figure(kind, data, **{name: SAMPLE[name]})
        assert str(err.value) == f"--{name} does not apply to the {kind} figure"


@pytest.mark.parametrize("kind", ["variance", "heatmap", "ratio", "grad", "gates", "loss"])
def test_none_keeps_the_default(data, kind):
    runs = ["pre", "gpas"]
    plain, explicit = make_figure(kind, data, runs=runs), make_figure(kind, data, runs=runs, step=None, site=None,
                                                                        stat=None, layers=None)
    for a, b in zip(panel_axes(plain), panel_axes(explicit), strict=True):
        assert [ln.get_label() for ln in a.get_lines()] == [ln.get_label() for ln in b.get_lines()]
        for la, lb in zip(a.get_lines(), b.get_lines(), strict=True):
            np.testing.assert_array_equal(la.get_ydata(), lb.get_ydata())


# ---- step ---------------------------------------------------------------------------------------------


def test_step_draws_only_that_step_in_the_variance_figure(data):
    fig = make_figure("variance", data, runs=["pre", "gpas"], step=30)
    for ax in panel_axes(fig):
        (line,) = line_artists(ax)
        raw = raw_rows(data, ax.get_title(), "resid_post", "fwd", "var")
        assert line.get_label() == "30"
        np.testing.assert_allclose(line.get_ydata(), raw[raw.step == 30].sort_values("layer").value)


@pytest.mark.parametrize("kind", ["ratio", "grad"])
def test_step_picks_the_step_of_the_layer_profiles(data, kind):
    fig = make_figure(kind, data, runs=["pre", "gpas"], step=30)
    drawn = [ax for ax in panel_axes(fig) if line_artists(ax)]
    assert drawn and all("step 30" in ax.get_title() for ax in drawn)
    site, direction, stat = ("attn", "fwd", "shortcut_branch_ratio") if kind == "ratio" else ("params", "none",
                                                                                              "grad_norm")
    ax = drawn[0] if kind == "ratio" else drawn[-1]
    line = [ln for ln in line_artists(ax) if ln.get_label() in ("pre", "pre · attn")][0]
    raw = raw_rows(data, "pre", site, direction, stat)
    np.testing.assert_allclose(line.get_ydata(), raw[raw.step == 30].sort_values("layer").value)


def test_step_picks_the_profiled_step(data):
    fig = make_figure("importance", data, runs=["prof"], step=10)
    assert all("step 10" in ax.get_title() for ax in panel_axes(fig))
    fig = make_figure("angular", data, runs=["prof"], step=10)
    assert panel_axes(fig)[0].get_title() == "prof (step 10)"


@pytest.mark.parametrize("kind, step, recorded", [("variance", 99999, "0..110 (12 steps)"),
                                                  ("ratio", 5, "0..110 (12 steps)"),
                                                  ("grad", 5, "0..110 (12 steps)"),
                                                  ("importance", 15, "10, 20"), ("angular", 15, "10, 20")])
def test_a_step_not_recorded_names_the_recorded_steps(data, kind, step, recorded):
    runs = ["prof"] if kind in ("importance", "angular") else ["pre", "gpas"]
    with pytest.raises(ValueError, match=rf"^step {step} was not recorded for the {kind} figure.*; "
                                         rf"recorded steps: {re.escape(recorded)}$"):
        make_figure(kind, data, runs=runs, step=step)


# ---- site ---------------------------------------------------------------------------------------------


def test_site_of_the_variance_heatmap_and_grad_figures(data):
    fig = make_figure("variance", data, runs=["pre"], site="attn_out")
    ax = panel_axes(fig)[0]
    assert "attn_out" in ax.get_ylabel()
    raw = raw_rows(data, "pre", "attn_out", "fwd", "var")
    last = line_artists(ax)[-1]
    np.testing.assert_allclose(last.get_ydata(), raw[raw.step == int(last.get_label())].sort_values("layer").value)
    fig = make_figure("heatmap", data, runs=["pre"], site="mlp_out")
    raw = raw_rows(data, "pre", "mlp_out", "fwd", "var").pivot(index="layer", columns="step", values="value")
    np.testing.assert_allclose(np.asarray(_mesh(panel_axes(fig)[0]).get_array()).reshape(raw.shape),
                               np.log10(raw.to_numpy()))
    fig = make_figure("grad", data, runs=["pre"], site="resid_mid")
    fwd, bwd, _ = panel_axes(fig)
    assert "resid_mid" in fwd.get_ylabel() and "∂L/∂resid_mid" in bwd.get_ylabel()


def test_site_of_the_ratio_figure_is_one_sublayer(data):
    fig = make_figure("ratio", data, runs=["pre", "gpas"], site="mlp")
    for ax in panel_axes(fig):
        assert sorted(ln.get_label() for ln in line_artists(ax)) == ["gpas · mlp", "pre · mlp"]
    with pytest.raises(ValueError, match="choose one of attn, mlp"):
        make_figure("ratio", data, site="resid_post")


@pytest.mark.parametrize("kind", ["variance", "heatmap", "grad"])
def test_a_site_not_recorded_names_the_recorded_sites(data, kind):
    with pytest.raises(ValueError, match=r"^site 'nope' was not recorded for the .*; recorded sites: attn_out, "
                                         r"mlp_out, resid_mid, resid_post, resid_pre$"):
        make_figure(kind, data, runs=["pre"], site="nope")


# ---- stat ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["variance", "heatmap"])
def test_stat_of_the_activation_figures(data, kind):
    fig = make_figure(kind, data, runs=["pre"], stat="absmax")
    assert "max |x|" in fig.get_suptitle()
    with pytest.raises(ValueError, match=r"^stat 'var_robust' was not recorded .*; recorded stats: absmax, rms, "
                                         r"var$"):
        make_figure(kind, data, runs=["pre"], stat="var_robust")
    with pytest.raises(ValueError, match="is not drawn by the .* figure; choose one of var, rms, absmax"):
        make_figure(kind, data, stat="alpha")


def test_stat_of_the_gates_figure(data):
    fig = make_figure("gates", data, runs=["gpas"], stat="alpha")
    ax = panel_axes(fig)[0]
    assert "α" in ax.get_ylabel()
    raw = raw_rows(data, "gpas", "gpas", "none", "alpha")
    np.testing.assert_allclose(line_artists(ax)[2].get_ydata(), raw[raw.layer == 2].sort_values("step").value)
    with pytest.raises(ValueError, match="choose one of alpha, silu_alpha, scale, alpha_grad"):
        make_figure("gates", data, stat="var")


def test_stat_of_the_importance_figures(data):
    fig = make_figure("importance", data, runs=["prof"], stat="block_influence")
    (ax,) = panel_axes(fig)
    assert ax.get_title().startswith("block influence")
    fig = make_figure("importance-steps", data, runs=["prof"], stat="block_influence")
    raw = data.query("run_id == 'prof' and stat == 'block_influence'").pivot(index="layer", columns="step",
                                                                              values="value")
    np.testing.assert_allclose(np.asarray(_mesh(panel_axes(fig)[0]).get_array()).reshape(raw.shape), raw.to_numpy())
    with pytest.raises(ValueError, match=r"^stat 'deletion_loss' was not recorded .*; recorded stats: "
                                         r"block_influence, deletion_delta$"):
        make_figure("importance", data, runs=["prof"], stat="deletion_loss")


# ---- layers -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["variance", "ratio", "grad", "gates", "importance"])
def test_layers_keep_only_those_layers_in_the_profiles(data, kind):
    runs = ["prof"] if kind == "importance" else ["gpas"]
    fig = make_figure(kind, data, runs=runs, layers=[1, 4])
    xs = {float(x) for ax in panel_axes(fig) for ln in line_artists(ax) for x in ln.get_xdata()}
    if kind == "gates":  # one line per layer, over the steps
        assert len(line_artists(panel_axes(fig)[0])) == 2
    elif kind == "importance":
        bars = [b for ax in panel_axes(fig) for c in ax.containers for b in c]
        assert sorted({round(b.get_x() + b.get_width() / 2) for b in bars}) == [1, 4]
    else:
        assert xs == {1.0, 4.0}


def test_layers_keep_those_rows_of_the_heatmaps_and_start_layers_of_the_triangle(data):
    fig = make_figure("heatmap", data, runs=["pre"], layers=[0, 2, 5])
    assert [t.get_text() for t in panel_axes(fig)[0].get_yticklabels()] == ["0", "2", "5"]
    fig = make_figure("importance-steps", data, runs=["prof"], layers=[3, 1])
    assert [t.get_text() for t in panel_axes(fig)[0].get_yticklabels()] == ["1", "3"]
    fig = make_figure("angular", data, runs=["prof"], layers=[0, 2])
    ax = panel_axes(fig)[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "2"]
    # the scaling within each n still uses every start layer: the cells are the full triangle's
    full = make_figure("angular", data, runs=["prof"])
    whole = np.ma.asarray(_mesh(panel_axes(full)[0]).get_array()).reshape(5, 5)
    part = np.ma.asarray(_mesh(ax).get_array()).reshape(5, 2)
    np.testing.assert_array_equal(part.filled(np.nan), whole[:, [0, 2]].filled(np.nan))


def test_layers_keep_the_model_rows_and_name_the_recorded_layers(data):
    kept = keep_layers(data, ["pre"], [2])
    assert set(kept.layer) == {-1, 2} and len(kept[kept.layer == -1]) == len(data[data.layer == -1])
    with pytest.raises(ValueError, match=r"^layer 9 was not recorded; recorded layers: 0, 1, 2, 3, 4, 5$"):
        make_figure("variance", data, runs=["pre"], layers=[1, 9])
    deep = synthetic(runs=("d",), n_layers=24, steps=(0, 10))
    with pytest.raises(ValueError, match=r"^layers 30, 31 were not recorded; recorded layers: 0..23 \(24 layers\)$"):
        make_figure("variance", deep, layers=[30, 31, 2])
    with pytest.raises(ValueError, match="layers is empty"):
        make_figure("variance", data, layers=[])
    with pytest.raises(ValueError, match="layer indices"):
        make_figure("variance", data, layers=["top"])
