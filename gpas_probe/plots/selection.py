"""The selection keywords every figure kind accepts (``step``, ``site``, ``stat``, ``layers``; the CLI's
``--step``, ``--site``, ``--stat``, ``--layers``): which kinds they apply to, and one-line errors naming
what was recorded when a requested value was not."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import pandas as pd

from gpas_probe.plots.common import ACTIVATION_STATS
from gpas_probe.plots.importance import ANGULAR_PREFIX, IMPORTANCE_SITE, IMPORTANCE_STATS
from gpas_probe.store.schema import GATE_SITES
from gpas_probe.table import GATE_STATS, layer_rows, select

#: The selection keywords that apply to each figure kind.
FIGURE_OPTIONS: dict[str, frozenset[str]] = {
    "variance": frozenset({"step", "site", "stat", "layers"}),
    "heatmap": frozenset({"site", "stat", "layers"}),
    "ratio": frozenset({"step", "site", "layers"}),
    "grad": frozenset({"step", "site", "layers"}),
    "gates": frozenset({"stat", "layers"}),
    "loss": frozenset(),
    "importance": frozenset({"step", "stat", "layers"}),
    "angular": frozenset({"step", "layers"}),
    "importance-steps": frozenset({"stat", "layers"}),
}
#: The statistics a kind's ``stat`` may name.
STAT_CHOICES: dict[str, tuple[str, ...]] = {
    "variance": ACTIVATION_STATS, "heatmap": ACTIVATION_STATS, "gates": GATE_STATS,
    "importance": IMPORTANCE_STATS, "importance-steps": IMPORTANCE_STATS,
}
RATIO_SITES = ("attn", "mlp")
PLURAL = {"step": "steps", "layer": "layers", "site": "sites", "stat": "stats"}


def check_applies(kind: str, chosen: Mapping[str, object]) -> None:
    """``ValueError`` for the first keyword given (not None) that the ``kind`` figure has no use for."""
    for name, value in chosen.items():
        if value is not None and name not in FIGURE_OPTIONS[kind]:
            raise ValueError(f"--{name} does not apply to the {kind} figure")


def describe(name: str, values: Iterable[object]) -> str:
    """Recorded values for an error: ``1..300 (21 steps)`` for many numbers, else a comma list."""
    present = sorted(set(values))
    if not present:
        return "none"
    if name in ("step", "layer") and len(present) > 6:
        return f"{present[0]}..{present[-1]} ({len(present)} {PLURAL[name]})"
    return ", ".join(str(v) for v in present)


def _need(name: str, value: object, present: set[object], kind: str, where: str = "") -> None:
    """``ValueError`` unless ``value`` is among ``present`` (no check when nothing is present: the figure
    itself then says which rows are missing)."""
    present = set(present)
    if present and value not in present:
        context = f" for the {kind} figure" + (f" ({where})" if where else "")
        raise ValueError(f"{name} {value!r} was not recorded{context}; recorded {PLURAL[name]}: "
                         f"{describe(name, present)}")


def _choice(kind: str, stat: str) -> None:
    choices = STAT_CHOICES[kind]
    if stat not in choices:
        raise ValueError(f"stat {stat!r} is not drawn by the {kind} figure; choose one of {', '.join(choices)}")


def _values(rows: pd.DataFrame, column: str) -> set[object]:
    return {v.item() if isinstance(v, np.generic) else v for v in pd.unique(rows[column].to_numpy())}


def check_options(kind: str, data: pd.DataFrame, runs: list[str], *, step: int | None, site: str | None,
                  stat: str | None, options: Mapping[str, object]) -> None:
    """Each given ``step``, ``site`` and ``stat`` was recorded in ``runs``' rows that the ``kind`` figure
    draws (``options`` are the figure's other keywords, e.g. ``direction``); else ``ValueError`` naming what
    was recorded. Defaults (None) are not checked here."""
    if step is None and site is None and stat is None:
        return
    if stat is not None and kind in STAT_CHOICES:
        _choice(kind, stat)
    rows = layer_rows(select(data, run_id=runs))
    if kind in ("variance", "heatmap"):
        act = select(rows, direction=str(options.get("direction", "fwd")))
        if stat is not None:
            _need("stat", stat, _values(act, "stat") & set(ACTIVATION_STATS), kind)
        used = stat or str(options.get("stat", "var"))
        act = select(act, stat=used)
        if site is not None:
            _need("site", site, _values(act, "site"), kind, f"{used} rows")
        if step is not None:
            where = site or str(options.get("site", "resid_post"))
            _need("step", step, _values(select(act, site=where), "step"), kind, f"{used} at {where}")
    elif kind == "grad":
        rms = select(rows, stat="rms", direction=["fwd", "bwd"])
        if site is not None:
            _need("site", site, _values(rms, "site"), kind, "rms rows")
        if step is not None:
            where = site or str(options.get("site", "resid_post"))
            grads = select(rows, site="params", stat="grad_norm")
            _need("step", step, _values(select(rms, site=where), "step") | _values(grads, "step"), kind)
    elif kind == "ratio":
        ratio = select(rows, stat="shortcut_branch_ratio")
        if site is not None:
            if site not in RATIO_SITES:
                raise ValueError(f"site {site!r} is not drawn by the ratio figure; choose one of "
                                 f"{', '.join(RATIO_SITES)}")
            _need("site", site, _values(ratio, "site"), kind)
        if step is not None:
            _need("step", step, _values(select(ratio, site=[site] if site else list(RATIO_SITES)), "step"), kind)
    elif kind == "gates" and stat is not None:
        gate = _values(select(rows, site=list(GATE_SITES)), "stat")
        _need("stat", stat, (gate | {"scale"}) if "alpha" in gate else gate, kind)
    elif kind in ("importance", "importance-steps"):
        imp = select(rows, site=IMPORTANCE_SITE)
        if stat is not None:
            _need("stat", stat, _values(imp, "stat") & set(IMPORTANCE_STATS), kind)
        if step is not None:
            _need("step", step, _values(select(imp, stat=[stat] if stat else list(IMPORTANCE_STATS)), "step"), kind)
    elif kind == "angular" and step is not None:
        sites = [s for s in _values(rows, "site") if str(s).startswith(ANGULAR_PREFIX)]
        _need("step", step, _values(select(rows, site=sites), "step"), kind)


def keep_layers(data: pd.DataFrame, runs: list[str], layers: Iterable[int] | int) -> pd.DataFrame:
    """``data`` with only the per-layer rows of ``layers`` (model-level rows, layer -1, are kept);
    ``ValueError`` naming the recorded layers when one was not recorded in ``runs``."""
    try:
        wanted = sorted({int(layer) for layer in ([layers] if np.ndim(layers) == 0 else layers)})  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(f"layers must be layer indices (integers), got {layers!r}") from None
    if not wanted:
        raise ValueError("layers is empty: give one or more layer indices")
    present = {int(v) for v in layer_rows(select(data, run_id=runs))["layer"].unique()}
    absent = [layer for layer in wanted if layer not in present]
    if present and absent:
        word = "layer" if len(absent) == 1 else "layers"
        raise ValueError(f"{word} {', '.join(map(str, absent))} {'was' if len(absent) == 1 else 'were'} not "
                         f"recorded; recorded layers: {describe('layer', present)}")
    layer = data["layer"].to_numpy()
    return data[(layer < 0) | np.isin(layer, wanted)]
