"""Findings a diagnosis reports beside its verdict: sink tokens and massive activations.

A layer *has massive activations* when its outlier tokens (a token RMS above ``outlier_factor`` times
the median token's, :mod:`gpas_probe.probes.outliers`) carry at least ``min_share`` of the variance of
its output (``outlier_var_share`` at ``resid_post``). The finding names the first such layer, the hidden
dimension and position where the largest activation sits there (the most common among those layers),
the input token when recorded, and how many windows have one at their first position.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from gpas_probe.table import layer_rows, select

SITE = "resid_post"
STATS = ("outlier_var_share", "outlier_frac", "outlier_pos0_frac", "absmax", "absmax_dim", "absmax_pos",
         "absmax_token", "var", "var_robust")


def massive_activations(data: pd.DataFrame, step: int | None = None, min_share: float = 0.5) -> dict[str, Any] | None:
    """The massive-activation finding of one run's table at ``step`` (default: the last with outlier
    rows), or None when no layer has them (or the outliers family was not recorded)."""
    rows = layer_rows(select(data, stat=list(STATS), site=SITE, direction="fwd"))
    if rows.empty or not (rows["stat"].astype(str) == "outlier_var_share").any():
        return None
    chosen = int(rows["step"].max()) if step is None else int(step)
    table = (rows[rows["step"].to_numpy() == chosen].assign(stat=lambda f: f["stat"].astype(str))
             .pivot_table(index="layer", columns="stat", values="value", aggfunc="mean"))
    hit = table[table["outlier_var_share"] >= min_share]
    if hit.empty:
        return None
    first = int(hit.index.min())
    dim = int(hit["absmax_dim"].mode().iloc[0])
    pos = int(hit["absmax_pos"].mode().iloc[0])
    windows = float(hit["outlier_pos0_frac"].max())
    token = None
    if "absmax_token" in hit and hit["absmax_token"].notna().any():
        token = int(hit["absmax_token"].mode().iloc[0])
    where = (f"at the first position of {'every' if windows >= 0.999 else f'{windows:.0%} of the'} window"
             + ("" if windows >= 0.999 else "s")) if pos == 0 and windows > 0 else f"at position {pos}"
    jump = float(table.loc[first, "var"] / table.loc[first - 1, "var"]) if first - 1 in table.index else math.nan
    text = (f"massive activations from layer {first} in dimension {dim} {where}"
            + (f" (token id {token})" if token is not None else "")
            + f": outlier tokens carry {hit.loc[first, 'outlier_var_share']:.0%} of layer {first}'s variance"
            + (f", which jumps ×{jump:.3g} there" if math.isfinite(jump) else "")
            + "; the verdict reads the statistics without them")
    return {"from_layer": first, "layers": [int(v) for v in hit.index], "dimension": dim, "position": pos,
            "token": token, "first_position_windows": windows,
            "var_share": float(hit.loc[first, "outlier_var_share"]),
            "largest": float(hit["absmax"].max()), "step": chosen, "text": text}
