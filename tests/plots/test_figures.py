"""Whole figures (``make_figure`` for every kind, one and several runs) and saving them."""


import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from plot_tables import all_texts, line_artists, synthetic  # noqa: E402

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

PANELS = {"variance": lambda n: n, "heatmap": lambda n: n, "ratio": lambda n: 2, "grad": lambda n: 3,
          "gates": lambda n: n, "loss": lambda n: 1}


PROFILE_KINDS = {"importance", "angular", "importance-steps"}  # need profile rows: tests/plots/test_importance.py


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
    assert line_artists(pre) == [] and "no variance of ∂L/∂resid_post recorded" in all_texts(pre)
    assert len(line_artists(gpas_ax)) == 8 and gpas_ax.get_yscale() == "log"
    assert pre.get_shared_y_axes().joined(pre, gpas_ax)
    fig = make_figure("gates", two_runs)
    assert "no GPAS gates in this run" in all_texts(fig.axes[0]) and len(line_artists(fig.axes[1])) == 6
    fig = make_figure("gates", two_runs, runs=["pre"])  # baselines only: a figure that says so, no error
    assert "no GPAS gates in this run" in all_texts(fig.axes[0]) and len(fig.axes) == 1
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
    assert [ln.get_label() for ln in line_artists(ax)] == ["gpas"] and "no loss: pre" in all_texts(ax)


def test_grad_figure_notes_a_run_without_backward_stats(two_runs):
    mixed = pd.concat([synthetic(runs=("pre",), bwd=False), two_runs[two_runs.run_id == "gpas"]], ignore_index=True)
    fig = make_figure("grad", mixed)
    fwd, bwd, params = fig.axes[:3]
    assert len(line_artists(fwd)) == 2 and len(line_artists(params)) == 2
    assert [ln.get_label() for ln in line_artists(bwd)] == ["gpas"] and "pre" in all_texts(bwd)
    with pytest.raises(MissingDataError, match="no run has"):
        make_figure("grad", two_runs[~two_runs.stat.isin(["rms", "grad_norm"])])
