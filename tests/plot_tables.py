"""Synthetic long tables in the probe schema for the plot tests, and readers of what a plot drew."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
from matplotlib.axes import Axes

ACT_SITES = ["resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post"]
STRING_COLUMNS = ["run_id", "site", "direction", "stat"]


def silu(a: np.ndarray) -> np.ndarray:
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
                stats = {"alpha": alpha, "silu_alpha": silu(alpha), "alpha_grad": -0.01 * alpha}
                if record_scale:
                    stats["scale"] = 1 - silu(alpha)
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


def raw_rows(data, run, site, direction, stat):
    """Brute-force reference: plain Python filtering of the raw rows."""
    d = data.astype({c: str for c in STRING_COLUMNS})
    keep = (d.run_id == run) & (d.site == site) & (d.direction == direction) & (d.stat == stat)
    return d[keep]


def line_artists(ax: Axes):
    return [ln for ln in ax.get_lines() if ln.get_linestyle() not in ("None", "none", "")]


def all_texts(ax: Axes) -> str:
    return " | ".join(t.get_text() for t in ax.texts)


def profile_table(runs=("p",), n_layers: int = 5, steps=(10, 20)) -> pd.DataFrame:
    """Rows in the shape a profile writes: importance (deletion cost, block influence) per layer and step,
    and the angular distances ``angular_n{n}`` of every block that fits; each value depends on its keys."""
    rows = []
    for r, run in enumerate(runs):
        for step in steps:
            for layer in range(n_layers):
                rows.append((run, step, layer, "importance", "none", "deletion_delta",
                             0.1 * (layer + 1) * (1 + step / 100) + 0.01 * r))
                rows.append((run, step, layer, "importance", "none", "block_influence", 0.02 * (n_layers - layer) + r))
                for n in range(1, n_layers - layer + 1):
                    rows.append((run, step, layer, f"angular_n{n}", "none", "angular_distance",
                                 0.05 * n + 0.01 * ((layer * 7 + n) % 5) + 0.001 * step))
    out = pd.DataFrame(rows, columns=["run_id", "step", "layer", "site", "direction", "stat", "value"])
    return out.astype({"step": "int64", "layer": "int16"})


def colorbar_axes(fig) -> list[Axes]:
    return [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]


def panel_axes(fig) -> list[Axes]:
    return [ax for ax in fig.axes if ax.get_visible() and ax.get_label() != "<colorbar>"]


def _long_axis(cax: Axes):
    """The axis of a colour bar that carries its values (the other one has no ticks)."""
    return cax.xaxis if len(cax.get_yticks()) == 0 else cax.yaxis


def colorbar_range(cax: Axes) -> tuple[float, float]:
    """The value range of a colour bar: its long axis's limits."""
    return tuple(float(v) for v in _long_axis(cax).get_view_interval())


def colorbar_label(cax: Axes):
    """The label (a Text) of a colour bar."""
    return _long_axis(cax).label


def colorbar_ticks(cax: Axes) -> list[float]:
    """The ticks of a colour bar that lie within its range."""
    lo, hi = sorted(colorbar_range(cax))
    locs = _long_axis(cax).get_ticklocs()
    return [float(t) for t in locs if lo - 1e-12 <= t <= hi + 1e-12]


def figure_texts(fig) -> str:
    """Every text of a figure (its own, its suptitle, its Axes' titles, labels and texts)."""
    from matplotlib.text import Text

    return " | ".join(t.get_text() for t in fig.findobj(Text) if t.get_text())
