"""Importance plots: one bar per layer and run with the recorded heights, the angular triangle holding the
recorded (or by-hand normalized) distances with NaN beyond the last layer, the layer × step heatmap, the
registry entries for one and two runs, the 'run gpas-probe profile first' errors, and no style changes."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.collections import QuadMesh  # noqa: E402
from matplotlib.colors import SymLogNorm  # noqa: E402
from matplotlib.container import BarContainer, ErrorbarContainer  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from matplotlib.text import Text  # noqa: E402
from plot_tables import (  # noqa: E402
    colorbar_axes,
    colorbar_label,
    colorbar_range,
    colorbar_ticks,
    panel_axes,
    profile_table,
)

from gpas_probe import ModelConfig, analysis, build_model  # noqa: E402
from gpas_probe.plots import (  # noqa: E402
    FIGURES,
    MissingDataError,
    angular_heatmap,
    importance_bars,
    importance_over_training,
    make_figure,
    save_figure,
)
from gpas_probe.plots.importance import MIN_ROW_CELLS, angular_table  # noqa: E402
from gpas_probe.plots.importance import colorbar_ticks as ticks_for  # noqa: E402

L = 5


def _batches(seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (3, 17), generator=g)
    return [(ids[:, :-1], ids[:, 1:])]


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(ModelConfig.from_preset("tiny", num_layers=L))
    with torch.no_grad():  # branches large enough that layers differ
        for name, p in model.named_parameters():
            if name.startswith("layers.") and p.ndim == 2:
                p.normal_(0.0, 0.5 / math.sqrt(p.shape[1]))
    return model


@pytest.fixture(scope="module")
def real() -> dict:
    """Two 'runs' (two random tiny models), importance in the long schema, and the frames it came from."""
    frames, parts = {}, []
    for run, seed in (("a", 0), ("b", 1)):
        imp = analysis.layer_importance(_model(seed), _batches())
        frames[run] = imp
        parts += [analysis.to_long(f, run, 40) for f in imp.values()]
    series = analysis.importance_over_training([(10, _model(2)), (20, _model(3)), (30, _model(4))], _batches)
    parts.append(analysis.to_long(series, "a"))
    normed = analysis.angular_distances(_model(5), _batches(), normalize_rows=True)
    parts.append(analysis.to_long(normed, "c", 7))
    frames["c"] = normed
    frames["series"] = series
    return {"data": pd.concat(parts, ignore_index=True), "frames": frames}


def _mesh(ax) -> np.ma.MaskedArray:
    meshes = [c for c in ax.collections if isinstance(c, QuadMesh)]
    assert len(meshes) == 1
    return np.ma.asarray(meshes[0].get_array())


# ------------------------------------------------------------------------------------------------ bars


def _bars(ax) -> list[BarContainer]:
    return [c for c in ax.containers if isinstance(c, BarContainer)]


def _error_bars(ax) -> list[ErrorbarContainer]:
    return [c for c in ax.containers if isinstance(c, ErrorbarContainer)]


def test_bars_one_per_layer_and_run_with_the_recorded_heights(real) -> None:
    data, frames = real["data"], real["frames"]
    ax = importance_bars(data, ax=plt.figure().gca(), runs=["a", "b"])
    assert len(_bars(ax)) == 2 and len(_error_bars(ax)) == 2
    centres = []
    for container, errors, run in zip(_bars(ax), _error_bars(ax), ["a", "b"], strict=True):
        assert len(container) == L and container.get_label() == run
        heights = [bar.get_height() for bar in container]
        deletion = frames[run]["deletion"]
        np.testing.assert_allclose(heights, deletion["delta"])  # step 40, the last
        centres.append([bar.get_x() + bar.get_width() / 2 for bar in container])
        # the error bars span the recorded 95% interval
        segments = errors.lines[2][0].get_segments()
        np.testing.assert_allclose([seg[0][1] for seg in segments], deletion["delta_lo"])
        np.testing.assert_allclose([seg[1][1] for seg in segments], deletion["delta_hi"])
    np.testing.assert_allclose(np.mean(centres, axis=0), np.arange(L))  # side by side around each layer
    assert all(c0 < c1 for c0, c1 in zip(*centres, strict=True))
    assert "step 40" in ax.get_title()
    ax = importance_bars(data, ax=plt.figure().gca(), runs=["b"], stat="block_influence")
    assert len(_bars(ax)) == 1
    np.testing.assert_allclose([b.get_height() for b in _bars(ax)[0]], frames["b"]["block_influence"]["influence"])


def test_bars_at_an_earlier_step(real) -> None:
    series = real["frames"]["series"]
    ax = importance_bars(real["data"], ax=plt.figure().gca(), runs=["a"], step=20)
    np.testing.assert_allclose([b.get_height() for b in _bars(ax)[0]],
                               series[series["step"] == 20].sort_values("layer")["delta"])


def test_bars_name_unprofiled_runs_and_fail_when_none_is_profiled(real) -> None:
    ax = importance_bars(real["data"], ax=plt.figure().gca(), runs=["a", "c"])  # c has angular rows only
    assert len(_bars(ax)) == 1 and "not profiled: c" in " ".join(t.get_text() for t in ax.texts)
    with pytest.raises(MissingDataError, match="gpas-probe profile"):
        importance_bars(real["data"], ax=plt.figure().gca(), runs=["c"])
    with pytest.raises(ValueError, match="stat must be one of"):
        importance_bars(real["data"], stat="var")


# ------------------------------------------------------------------------------------------ triangle


def test_angular_heatmap_holds_the_distances_and_nan_beyond_the_last_layer(real) -> None:
    raw = real["frames"]["a"]["angular"]
    ax = angular_heatmap(real["data"], ax=plt.figure().gca(), run="a", normalized=False)
    cells = _mesh(ax).reshape(L, L)  # rows n = 1..L, columns l = 0..L-1
    for n in range(1, L + 1):
        for layer in range(L):
            if layer + n > L:
                assert cells.mask[n - 1, layer] or np.isnan(cells[n - 1, layer])
            else:
                want = raw[(raw["n"] == n) & (raw["layer"] == layer)]["distance"].item()
                assert cells[n - 1, layer] == pytest.approx(want)
    assert int(np.isfinite(cells.filled(np.nan)).sum()) == L * (L + 1) // 2
    lo, hi = ax.get_ylim()
    assert lo < hi  # n = 1 at the bottom
    assert ax.get_xlabel() == "start layer l"


def test_angular_normalized_by_hand_or_as_recorded(real) -> None:
    raw = real["frames"]["a"]["angular"]
    grid = angular_table(real["data"], "a", normalized=True)
    for n, rows in raw.groupby("n"):
        d = rows.sort_values("layer")["distance"].to_numpy()
        want = (d - d.min()) / (d.max() - d.min()) if d.max() > d.min() else np.zeros_like(d)
        np.testing.assert_allclose(grid.loc[n].to_numpy()[: len(d)], want, atol=1e-12)
    recorded = real["frames"]["c"]
    ax = angular_heatmap(real["data"], ax=plt.figure().gca(), run="c")
    cells = _mesh(ax).reshape(L, L)
    for row in recorded.itertuples():
        if L - row.n + 1 >= MIN_ROW_CELLS:
            assert cells[row.n - 1, row.layer] == pytest.approx(row.distance_norm)
        else:  # too few cells to scale: hatched, not coloured
            assert cells.mask[row.n - 1, row.layer] or np.isnan(cells[row.n - 1, row.layer])
    with pytest.raises(MissingDataError, match="gpas-probe profile"):
        angular_heatmap(real["data"].query("site == 'importance'"), run="a")


def _hatched(ax) -> list[Rectangle]:
    return [p for p in ax.patches if isinstance(p, Rectangle) and p.get_hatch()]


def test_scaled_triangle_hatches_rows_too_short_to_scale(real) -> None:
    ax = angular_heatmap(real["data"], ax=plt.figure().gca(), run="a")
    cells = _mesh(ax).reshape(L, L).filled(np.nan)
    short = [n for n in range(1, L + 1) if L - n + 1 < MIN_ROW_CELLS]
    assert short == [L - 1, L] and MIN_ROW_CELLS == 3  # the rows of one and two cells
    for n in range(1, L + 1):
        row = cells[n - 1, : L - n + 1]
        assert np.isnan(row).all() if n in short else np.isfinite(row).all()
    # every cell of a short row is hatched where the block exists, at that row and start layer
    spots = sorted((int(p.get_y()), int(p.get_x())) for p in _hatched(ax))
    assert spots == sorted((n - 1, layer) for n in short for layer in range(L - n + 1))
    texts = " ".join(t.get_text() for t in ax.texts)
    assert f"fewer than {MIN_ROW_CELLS}" in texts and "hatched" in texts
    # the raw distances have a shared scale: every cell drawn, nothing hatched
    raw = angular_heatmap(real["data"], ax=plt.figure().gca(), run="a", normalized=False)
    assert np.isfinite(_mesh(raw).reshape(L, L).filled(np.nan)).sum() == L * (L + 1) // 2 and not _hatched(raw)


def test_angular_figure_explains_the_scale_in_its_colour_bar(real) -> None:
    fig = make_figure("angular", real["data"], runs=["a", "b"])
    (cax,) = colorbar_axes(fig)
    label = colorbar_label(cax).get_text()
    assert "min-max scaled within each n" in label and f"< {MIN_ROW_CELLS} cells" in label
    assert all(_hatched(ax) for ax in panel_axes(fig))
    fig = make_figure("angular", real["data"], runs=["a", "b"], normalized=False)
    (cax,) = colorbar_axes(fig)
    lo, hi = colorbar_range(cax)
    raw = real["data"].query("run_id in ['a', 'b'] and stat == 'angular_distance'")["value"]
    assert (lo, hi) == pytest.approx((raw.min(), raw.max())) and "min-max" not in colorbar_label(cax).get_text()


# --------------------------------------------------------------------------------------- over training


def test_importance_over_training_is_the_layer_by_step_table(real) -> None:
    data = real["data"]
    ax = importance_over_training(data, ax=plt.figure().gca(), run="a")
    rows = data[(data.run_id == "a") & (data.site == "importance") & (data.stat == "deletion_delta")]
    ref = rows.pivot(index="layer", columns="step", values="value")
    assert list(ref.columns) == [10, 20, 30, 40]
    np.testing.assert_allclose(_mesh(ax).reshape(ref.shape), ref.to_numpy())
    assert len(ax.texts) == ref.size  # small grids are annotated
    assert [t.get_text() for t in ax.get_xticklabels()] == ["10", "20", "30", "40"]
    with pytest.raises(MissingDataError, match="gpas-probe profile"):
        importance_over_training(data, run="c")


# -------------------------------------------------------------------------------------------- registry

PANELS = {"importance": lambda n: 2, "angular": lambda n: n, "importance-steps": lambda n: n}


@pytest.mark.parametrize("kind", sorted(PANELS))
@pytest.mark.parametrize("runs", [["a"], ["a", "b"]])
def test_registry_renders_one_and_two_runs(real, kind, runs, tmp_path) -> None:
    assert kind in FIGURES
    fig = make_figure(kind, real["data"], runs=runs)
    assert isinstance(fig, Figure) and fig.get_suptitle()
    panels = [ax for ax in fig.axes if ax.get_visible() and ax.get_label() != "<colorbar>"]
    assert len(panels) == PANELS[kind](len(runs))
    path = save_figure(fig, tmp_path / f"{kind}.png")
    assert path.stat().st_size > 1000


def _title_boxes(fig) -> list:
    renderer = fig.canvas.get_renderer()
    titles = [t for t in fig.findobj(Text) if t.get_text() and t.get_text() == fig.get_suptitle()]
    titles += [ax.title for ax in panel_axes(fig) if ax.get_title()]
    return [t.get_window_extent(renderer) for t in titles]


MANY_STEPS = tuple(range(1000, 21000, 1000))  # rotated step labels shorten the panel under a long label


@pytest.mark.parametrize("table, runs", [("real", ["a"]), ("real", ["a", "a2"]), ("many", ["p"]),
                                         ("many", ["p", "q"])])
def test_importance_steps_colour_bar_label_clears_the_titles(real, table, runs) -> None:
    if table == "real":
        data = pd.concat([real["data"], real["data"].query("run_id == 'a'").assign(run_id="a2")], ignore_index=True)
    else:
        data = profile_table(runs=("p", "q"), n_layers=12, steps=MANY_STEPS)
    fig = make_figure("importance-steps", data, runs=runs)
    fig.canvas.draw()
    (cax,) = colorbar_axes(fig)
    label = colorbar_label(cax)
    assert "loss increase when deleted" in label.get_text()
    box = label.get_window_extent(fig.canvas.get_renderer())
    titles = _title_boxes(fig)
    assert len(titles) == 1 + len(runs)
    assert not any(box.overlaps(t) for t in titles)
    assert len(colorbar_ticks(cax)) >= 2


def test_importance_steps_of_one_profiled_step_points_to_the_importance_figure(real) -> None:
    with pytest.raises(MissingDataError, match="one step only.*importance figure"):
        make_figure("importance-steps", real["data"], runs=["b"])  # b: profiled at step 40 only
    with pytest.raises(MissingDataError, match="one step only"):
        importance_over_training(real["data"], ax=plt.figure().gca(), run="b")
    fig = make_figure("importance-steps", real["data"], runs=["a", "b"])
    a, b = panel_axes(fig)
    assert "one step only" in " ".join(t.get_text() for t in b.texts)
    assert len([c for c in a.collections if isinstance(c, QuadMesh)]) == 1


@pytest.mark.parametrize("lo, hi", [(0.3, 5.0), (0.02, 0.08), (-0.004, -0.001), (2.0, 3.0), (-1.0, 100.0)])
def test_symlog_colour_bars_never_have_a_single_tick(lo, hi) -> None:
    norm = SymLogNorm(linthresh=0.01 * max(abs(lo), abs(hi)), vmin=lo, vmax=hi)
    ticks = ticks_for(norm)["ticks"]
    assert len(ticks) >= 2 and all(lo <= t <= hi for t in ticks)
    data = profile_table(steps=(10, 20))
    scale = lo + (hi - lo) * (data["value"] - data["value"].min()) / (data["value"].max() - data["value"].min())
    fig = make_figure("importance-steps", data.assign(value=scale))
    assert len(colorbar_ticks(colorbar_axes(fig)[0])) >= 2


def test_figures_annotate_unprofiled_runs_and_fail_without_any(real) -> None:
    data = real["data"]
    training = pd.DataFrame({"run_id": "t", "step": 5, "layer": np.arange(L, dtype="int16"), "site": "resid_post",
                             "direction": "fwd", "stat": "var", "value": 1.0})
    both = pd.concat([data, training], ignore_index=True)
    for kind in ("angular", "importance-steps"):
        fig = make_figure(kind, both, runs=["a", "t"])
        texts = " | ".join(t.get_text() for t in fig.axes[1].texts)
        assert "gpas-probe profile" in texts
    for kind in ("importance", "angular", "importance-steps"):
        with pytest.raises(MissingDataError, match="gpas-probe profile"):
            make_figure(kind, training)
