"""Long tables with chosen per-layer evidence, for the diagnosis tests."""

from __future__ import annotations

import numpy as np
import pandas as pd

L = 8


def _rows(run: str, step: int, layer, site: str, direction: str, stat: str, value) -> pd.DataFrame:
    value = np.asarray(value, dtype=float)
    layer = np.broadcast_to(np.asarray(layer), value.shape)
    return pd.DataFrame({"run_id": run, "step": step, "layer": layer, "site": site, "direction": direction,
                         "stat": stat, "value": value}).astype({"step": "int64", "layer": "int16"})


def table(run: str = "r", step: int = 100, *, var=None, ratio=None, grad=None, deletion=None, angular=None,
          influence=None, loss: float = 3.0, half_width=None, tokens: float | None = None,
          var_robust=None, num_layers: int = L) -> pd.DataFrame:
    """A long table with the given per-layer evidence (None leaves a signal out) and a model loss row.
    ``half_width`` adds 95% bounds ``value ± half_width`` to deletion, angular distance and block influence
    (a profile's); ``tokens`` a model-level evaluation token count; ``var_robust`` the variance without
    outlier tokens; ``num_layers`` how many layers the evidence covers (``L`` unless given)."""
    layers = np.arange(num_layers)
    parts = [_rows(run, step, -1, "model", "none", "loss", [loss])]
    if tokens is not None:
        parts.append(_rows(run, step, -1, "model", "none", "tokens", [tokens]))
    bounded = {"deletion_delta": deletion, "angular_distance": angular, "block_influence": influence}
    if half_width is not None:
        for stat, value in bounded.items():
            if value is None:
                continue
            site = "angular_n1" if stat == "angular_distance" else "importance"
            for end, sign in (("lo", -1), ("hi", 1)):
                parts.append(_rows(run, step, layers, site, "none", f"{stat}_{end}",
                                   np.asarray(value, dtype=float) + sign * np.asarray(half_width, dtype=float)))
    if var_robust is not None:
        parts.append(_rows(run, step, layers, "resid_post", "fwd", "var_robust", var_robust))
    if var is not None:
        parts.append(_rows(run, step, layers, "resid_post", "fwd", "var", var))
        parts.append(_rows(run, step, layers, "resid_post", "bwd", "var", np.full(num_layers, 1e-6)))  # must be ignored
    if ratio is not None:  # attn and mlp straddle the given mean
        parts.append(_rows(run, step, layers, "attn", "fwd", "shortcut_branch_ratio", np.asarray(ratio) * 0.8))
        parts.append(_rows(run, step, layers, "mlp", "fwd", "shortcut_branch_ratio", np.asarray(ratio) * 1.2))
    if grad is not None:
        parts.append(_rows(run, step, layers, "params", "none", "grad_norm", grad))
    if deletion is not None:
        parts.append(_rows(run, step, layers, "importance", "none", "deletion_delta", deletion))
    if angular is not None:
        parts.append(_rows(run, step, layers, "angular_n1", "none", "angular_distance", angular))
        parts.append(_rows(run, step, layers[:-1], "angular_n2", "none", "angular_distance",
                           np.full(num_layers - 1, 0.001)))  # other block sizes must be ignored
    if influence is not None:
        parts.append(_rows(run, step, layers, "importance", "none", "block_influence", influence))
    return pd.concat(parts, ignore_index=True)


def underused_table(run: str = "sick", step: int = 100) -> pd.DataFrame:
    """Pre-LN at its worst: exponential variance, drowned deep branches, deep layers near-identity and free."""
    deep = np.arange(L) >= L // 2
    return table(run, step, var=2.0 ** np.arange(L), ratio=2 + 4.0 * np.arange(L),
                 grad=np.where(deep, 0.1, 1.0), deletion=np.where(deep, 0.001, 0.5),
                 angular=np.where(deep, 0.01, 0.2), influence=np.where(deep, 1e-4, 0.05))


def healthy_table(run: str = "fine", step: int = 100) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return table(run, step, var=1.0 + 0.05 * rng.random(L), ratio=np.full(L, 2.0), grad=1.0 + 0.1 * rng.random(L),
                 deletion=0.3 + 0.05 * rng.random(L), angular=0.2 + 0.02 * rng.random(L),
                 influence=np.full(L, 0.05))
