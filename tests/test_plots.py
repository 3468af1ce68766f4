"""Plot functions on synthetic long tables: right types, one artist per promised line, log axes where
promised, plotted values equal to a direct reduction of the raw rows, and no global style changes."""

from __future__ import annotations

import itertools

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.collections import QuadMesh  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from gpas_probe.plots import (  # noqa: E402
    FIGURES,
    MissingDataError,
    compare_figure,
    gates,
    grad_norm,
    loss_curves,
    make_figure,
    save_figure,
    shortcut_ratio,
    variance_growth,
    variance_heatmap,
)

ACT_SITES = ["resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post"]
STRING_COLUMNS = ["run_id", "site", "direction", "stat"]


def _silu(a: np.ndarray) -> np.ndarray:
    return a / (1.0 + np.exp(-a))


def synthetic(runs=("pre", "gpas"), n_layers: int = 6, steps=tuple(range(0, 120, 10)), gated=("gpas",),
              gate_sites=("gpas",), bwd=True, categorical=False, record_scale=True) -> pd.DataFrame:
    """Long table in the probe schema; every value depends on run, step, layer, site, direction and stat."""
    parts = []
    top = max(steps)
    for r, run in enumerate(runs):
        def frame(step, layer, site, direction, stat, value, run=run):
            out = pd.DataFrame({"value": np.asarray(value, float)})
            out = out.assign(run_id=run, step=step, layer=layer, site=site, direction=direction, stat=stat)
            return out.astype({"step": "int64", "layer": "int16"})

        dirs = ["fwd", "bwd"] if bwd else ["fwd"]
        grid = np.array(list(itertools.product(steps, range(n_layers), range(len(ACT_SITES)), range(len(dirs)),
                                               range(3))))
        s, lay, si, d, st = grid.T
        value = (r + 1) * 10 ** (0.08 * lay * (1 + s / top) + 0.01 * si - 0.5 * d + 0.2 * st)
        parts.append(frame(s, lay, np.array(ACT_SITES)[si], np.array(dirs)[d], np.array(["var", "rms", "absmax"])[st],
                           value))
        grid = np.array(list(itertools.product(steps, range(n_layers), range(2), range(2))))
        s, lay, si, st = grid.T
        value = np.where(st == 0, (r + 1) * (1 + lay) * (1 + s / top) * (1 + si), 0.1 * (lay + 1) / (r + 1) + 0.01 * si)
        parts.append(frame(s, lay, np.array(["attn", "mlp"])[si], "fwd",
                           np.array(["shortcut_branch_ratio", "shortcut_branch_cos"])[st], value))
        grid = np.array(list(itertools.product(steps, range(n_layers), range(3))))
        s, lay, st = grid.T
        parts.append(frame(s, lay, "params", "none", np.array(["grad_norm", "weight_norm", "update_ratio"])[st],
                           (r + 1) * 0.01 * (2 + lay + s / top) * (1 + st)))
        if run in gated:
            for g, site in enumerate(gate_sites):
                grid = np.array(list(itertools.product(steps, range(n_layers))))
                s, lay = grid.T
                alpha = (-1) ** g * 0.05 * (lay + 1) * s / top * (r + 1)
                stats = {"alpha": alpha, "silu_alpha": _silu(alpha), "alpha_grad": -0.01 * alpha}
                if record_scale:
                    stats["scale"] = 1 - _silu(alpha)
                for stat, v in stats.items():
                    parts.append(frame(s, lay, site, "none", stat, v))
        s = np.array(steps)
        for stat, v in {"loss": 10 - 5 * s / top - r * 0.3, "lr": 1e-3 + 0 * s, "grad_norm": 1 + s / top,
                        "tokens": 1000.0 * s}.items():
            parts.append(frame(s, -1, "model", "none", stat, v))
        vs = s[::3]
        parts.append(frame(vs, -1, "model", "none", "val_loss", 10.5 - 5 * vs / top - r * 0.3))
    data = pd.concat(parts, ignore_index=True)
    if categorical:
        data[STRING_COLUMNS] = data[STRING_COLUMNS].astype("category")
    else:
        data[STRING_COLUMNS] = data[STRING_COLUMNS].astype(str)
    return data


def _raw(data, run, site, direction, stat):
    """Brute-force reference: plain Python filtering of the raw rows."""
    d = data.astype({c: str for c in STRING_COLUMNS})
    keep = (d.run_id == run) & (d.site == site) & (d.direction == direction) & (d.stat == stat)
    return d[keep]


def _lines(ax: Axes):
    return [ln for ln in ax.get_lines() if ln.get_linestyle() not in ("None", "none", "")]


def _texts(ax: Axes) -> str:
    return " | ".join(t.get_text() for t in ax.texts)


@pytest.fixture(scope="module")
def two_runs() -> pd.DataFrame:
    return synthetic()


@pytest.fixture(scope="module")
def one_run(two_runs) -> pd.DataFrame:
    return two_runs[two_runs.run_id == "gpas"]


# ---- variance growth -------------------------------------------------------------------------------------


def test_variance_growth_subsamples_steps_and_plots_the_raw_values(two_runs):
    fig, ax = plt.subplots()
    out = variance_growth(two_runs, ax=ax, run="pre", max_steps=5)
    assert out is ax and ax.get_yscale() == "log"
    lines = _lines(ax)
    assert len(lines) == 5
    labels = [ln.get_label() for ln in lines]
    assert labels[0] == "0" and labels[-1] == "110"  # first and last recorded step always included
    raw = _raw(two_runs, "pre", "resid_post", "fwd", "var")
    for ln in lines:
        step = int(ln.get_label().replace(",", ""))
        ref = raw[raw.step == step].sort_values("layer")
        np.testing.assert_array_equal(ln.get_xdata(), ref.layer.to_numpy())
        np.testing.assert_allclose(ln.get_ydata(), ref.value.to_numpy())
    assert ax.get_legend() is not None and ax.get_legend().get_title().get_text() == "step"
    assert ax.get_title() == "pre"


def test_variance_growth_all_steps_when_few_and_explicit_steps(one_run):
    ax = variance_growth(one_run, ax=plt.figure().gca(), max_steps=20)  # single run: run= optional
    assert len(_lines(ax)) == 12
    ax = variance_growth(one_run, ax=plt.figure().gca(), steps=[50, 10], site="attn_out", direction="bwd")
    assert [ln.get_label() for ln in _lines(ax)] == ["10", "50"]
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
    for la, lb in zip(_lines(a), _lines(b), strict=True):
        np.testing.assert_array_equal(la.get_ydata(), lb.get_ydata())
    assert len(_lines(shortcut_ratio(cat, ax=plt.figure().gca()))) == 4
    assert len(_lines(gates(cat, ax=plt.figure().gca(), run="gpas"))) == 6


# ---- heatmap ------------------------------------------------------------------------------------------


def test_heatmap_holds_log10_of_every_layer_and_step(two_runs):
    ax = variance_heatmap(two_runs, ax=plt.figure().gca(), run="gpas")
    mesh = [c for c in ax.collections if isinstance(c, QuadMesh)]
    assert len(mesh) == 1
    raw = _raw(two_runs, "gpas", "resid_post", "fwd", "var")
    ref = np.log10(raw.pivot(index="layer", columns="step", values="value").to_numpy())
    np.testing.assert_allclose(np.asarray(mesh[0].get_array()).reshape(ref.shape), ref)
    lo, hi = ax.get_ylim()
    assert lo < hi  # row 0 (layer 0) at the bottom
    assert ax.get_xlabel() == "training step" and ax.get_ylabel() == "layer"


# ---- shortcut ratio -----------------------------------------------------------------------------------


def test_shortcut_ratio_one_line_per_run_and_sublayer_at_last_step(two_runs, one_run):
    ax = shortcut_ratio(two_runs, ax=plt.figure().gca())
    assert ax.get_yscale() == "log"
    lines = _lines(ax)
    assert sorted(ln.get_label() for ln in lines) == ["gpas · attn", "gpas · mlp", "pre · attn", "pre · mlp"]
    for ln in lines:
        run, site = ln.get_label().split(" · ")
        raw = _raw(two_runs, run, site, "fwd", "shortcut_branch_ratio")
        ref = raw[raw.step == raw.step.max()].sort_values("layer")
        np.testing.assert_allclose(ln.get_ydata(), ref.value.to_numpy())
    assert "step 110" in ax.get_title()
    assert len(_lines(shortcut_ratio(one_run, ax=plt.figure().gca()))) == 2
    ax = shortcut_ratio(two_runs, ax=plt.figure().gca(), stat="shortcut_branch_cos", step=30)
    assert ax.get_yscale() == "linear" and "step 30" in ax.get_title()


# ---- gradient norms -----------------------------------------------------------------------------------


@pytest.mark.parametrize("view, site, direction, stat", [("params", "params", "none", "grad_norm"),
                                                         ("bwd", "resid_post", "bwd", "rms"),
                                                         ("fwd", "resid_post", "fwd", "rms")])
def test_grad_norm_views_average_the_last_steps(two_runs, view, site, direction, stat):
    ax = grad_norm(two_runs, ax=plt.figure().gca(), view=view, last=3)
    assert ax.get_yscale() == "log"
    lines = _lines(ax)
    assert [ln.get_label() for ln in lines] == ["pre", "gpas"]
    for ln in lines:
        raw = _raw(two_runs, ln.get_label(), site, direction, stat)
        ref = raw[raw.step >= 90].groupby("layer").value.mean()
        np.testing.assert_allclose(ln.get_ydata(), ref.to_numpy())
    assert "90–110" in ax.get_title()


def test_grad_norm_names_runs_without_data_and_errors_when_none_has_it():
    mixed = pd.concat([synthetic(runs=("pre",), bwd=False), synthetic(runs=("gpas",))], ignore_index=True)
    ax = grad_norm(mixed, ax=plt.figure().gca(), view="bwd")
    assert [ln.get_label() for ln in _lines(ax)] == ["gpas"]
    assert "pre" in _texts(ax)
    with pytest.raises(MissingDataError, match="∂L/∂resid_post"):
        grad_norm(synthetic(runs=("pre",), bwd=False), ax=plt.figure().gca(), view="bwd")
    with pytest.raises(ValueError, match="view must be"):
        grad_norm(mixed, view="sideways")


# ---- gates --------------------------------------------------------------------------------------------


def test_gates_one_line_per_layer_scale_trajectory(two_runs):
    ax = gates(two_runs, ax=plt.figure().gca(), run="gpas")
    lines = _lines(ax)
    assert len(lines) == 6
    raw = _raw(two_runs, "gpas", "gpas", "none", "alpha")
    for layer, ln in enumerate(lines):
        a = raw[raw.layer == layer].sort_values("step")
        np.testing.assert_allclose(ln.get_ydata(), 1 - _silu(a.value.to_numpy()))
        np.testing.assert_array_equal(ln.get_xdata(), a.step.to_numpy())
    assert len({ln.get_color() for ln in lines}) == 6  # a colour per layer
    assert len(ax.figure.axes) == 2  # plus the layer colorbar


def test_gates_without_gates_says_so(two_runs):
    ax = gates(two_runs, ax=plt.figure().gca(), run="pre")
    assert _lines(ax) == [] and "no GPAS gates in this run" in _texts(ax)


def test_gates_per_sublayer_and_scale_derived_from_alpha():
    data = synthetic(runs=("gpas",), gate_sites=("gpas_attn", "gpas_mlp"), record_scale=False)
    ax = gates(data, ax=plt.figure().gca())
    lines = _lines(ax)
    assert len(lines) == 12
    assert {ln.get_linestyle() for ln in lines} == {"-", "--"}
    raw = _raw(data, "gpas", "gpas_mlp", "none", "alpha")
    ref = raw[raw.layer == 5].sort_values("step")
    np.testing.assert_allclose(lines[-1].get_ydata(), 1 - _silu(ref.value.to_numpy()))
    ax = gates(data, ax=plt.figure().gca(), stat="alpha_grad")
    assert len(_lines(ax)) == 12 and "∂L/∂α" in ax.get_ylabel()


# ---- loss ---------------------------------------------------------------------------------------------


def test_loss_curves_line_per_run_val_as_markers(two_runs, one_run):
    ax = loss_curves(two_runs, ax=plt.figure().gca())
    solid = _lines(ax)
    markers = [ln for ln in ax.get_lines() if ln not in solid]
    assert [ln.get_label() for ln in solid] == ["pre", "gpas"]
    assert [ln.get_label() for ln in markers] == ["pre (val)", "gpas (val)"]
    raw = _raw(two_runs, "gpas", "model", "none", "val_loss").sort_values("step")
    np.testing.assert_allclose(markers[1].get_ydata(), raw.value.to_numpy())
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "pre" in legend and "gpas (val)" in legend
    ax = loss_curves(one_run, ax=plt.figure().gca(), val=False, smooth=3, logy=True)
    assert len(ax.get_lines()) == 1 and ax.get_yscale() == "log"
    raw = _raw(one_run, "gpas", "model", "none", "loss").sort_values("step").value.to_numpy()
    np.testing.assert_allclose(ax.get_lines()[0].get_ydata()[1:-1], (raw[:-2] + raw[1:-1] + raw[2:]) / 3)


# ---- figures ------------------------------------------------------------------------------------------

PANELS = {"variance": lambda n: n, "heatmap": lambda n: n, "ratio": lambda n: 2, "grad": lambda n: 3,
          "gates": lambda n: n, "loss": lambda n: 1}


PROFILE_KINDS = {"importance", "angular", "importance-steps"}  # need profile rows: tests/test_plots_importance.py


def test_every_figure_kind_is_tested():
    assert set(FIGURES) == set(PANELS) | PROFILE_KINDS


@pytest.mark.parametrize("kind", sorted(PANELS))
@pytest.mark.parametrize("runs", [["gpas"], ["pre", "gpas"]])
def test_make_figure_every_kind_for_one_and_two_runs(two_runs, kind, runs):
    fig = make_figure(kind, two_runs, runs=runs)
    assert isinstance(fig, Figure)
    panels = [ax for ax in fig.axes if ax.get_visible() and ax.get_label() != "<colorbar>"]
    assert len(panels) == PANELS[kind](len(runs))
    assert fig.get_suptitle() or kind == "loss"


def test_compare_figure_annotates_runs_without_data_and_shares_y(two_runs):
    no_bwd = pd.concat([synthetic(runs=("pre",), bwd=False), two_runs[two_runs.run_id == "gpas"]], ignore_index=True)
    fig = compare_figure("variance", no_bwd, direction="bwd")
    pre, gpas_ax = fig.axes[:2]
    assert _lines(pre) == [] and "no variance of ∂L/∂resid_post recorded" in _texts(pre)
    assert len(_lines(gpas_ax)) == 8 and gpas_ax.get_yscale() == "log"
    assert pre.get_shared_y_axes().joined(pre, gpas_ax)
    fig = make_figure("gates", two_runs)
    assert "no GPAS gates in this run" in _texts(fig.axes[0]) and len(_lines(fig.axes[1])) == 6
    fig = make_figure("gates", two_runs, runs=["pre"])  # baselines only: a figure that says so, no error
    assert "no GPAS gates in this run" in _texts(fig.axes[0]) and len(fig.axes) == 1
    with pytest.raises(MissingDataError):
        make_figure("variance", synthetic(runs=("pre",), bwd=False), direction="bwd")


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
    assert [ln.get_label() for ln in _lines(ax)] == ["gpas"] and "no loss: pre" in _texts(ax)


def test_grad_figure_notes_a_run_without_backward_stats(two_runs):
    mixed = pd.concat([synthetic(runs=("pre",), bwd=False), two_runs[two_runs.run_id == "gpas"]], ignore_index=True)
    fig = make_figure("grad", mixed)
    fwd, bwd, params = fig.axes[:3]
    assert len(_lines(fwd)) == 2 and len(_lines(params)) == 2
    assert [ln.get_label() for ln in _lines(bwd)] == ["gpas"] and "pre" in _texts(bwd)
    with pytest.raises(MissingDataError, match="no run has"):
        make_figure("grad", two_runs[~two_runs.stat.isin(["rms", "grad_norm"])])
