"""Layer importance over training and in the long probe table.

:func:`importance_over_training` runs an analysis on a sequence of checkpoints, one model in memory at
a time; :func:`to_long` writes any importance frame as rows of the long probe table (DESIGN §7).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence

import pandas as pd
from torch import nn

from gpas_probe.analysis.importance import deletion_importance
from gpas_probe.analysis.streaming import ANGULAR_COLUMNS, DELETION_COLUMNS, ESTIMATE_COLUMNS, INFLUENCE_COLUMNS, Batch
from gpas_probe.store.schema import ANGULAR_PREFIX, IMPORTANCE_SITE, MODEL_LAYER, MODEL_SITE, as_table_frame

log = logging.getLogger(__name__)

ModelSource = nn.Module | Callable[[], nn.Module]


def importance_over_training(
    checkpoints: Sequence[tuple[int, ModelSource]],
    batches_factory: Callable[[], Iterable[Batch]],
    analysis: Callable[[nn.Module, Iterable[Batch]], pd.DataFrame] = deletion_importance,
) -> pd.DataFrame:
    """``analysis`` of each checkpoint, with a leading ``step`` column.

    ``checkpoints`` are ``(step, model)`` pairs where the model may be a zero-argument loader (for a run
    folder, :func:`gpas_probe.checkpoints.step_loaders` gives them); loaders are called one at a time,
    so one model is in memory at once. ``batches_factory`` returns a fresh iterable of batches for each
    checkpoint."""
    sources = list(checkpoints)
    if not sources:
        raise ValueError("no checkpoints given")
    frames = []
    for step, source in sources:
        model = source if isinstance(source, nn.Module) else source()
        log.info("layer importance at step %d", step)
        df = analysis(model, batches_factory())
        df.insert(0, "step", int(step))
        frames.append(df)
        del model
    return pd.concat(frames, ignore_index=True)


def to_long(df: pd.DataFrame, run_id: str, step: int | None = None) -> pd.DataFrame:
    """Any importance frame (:mod:`gpas_probe.analysis.streaming`) in the long probe schema (DESIGN §7).

    Deletion: ``site='importance'``, stats ``deletion_delta`` (with its 95% interval
    ``deletion_delta_lo``/``_hi``) and ``deletion_loss``, plus the base loss as ``layer=-1,
    site='model', stat='val_loss'``. Block influence: ``site='importance'``, stat ``block_influence``
    (and ``_lo``/``_hi``). Angular distance: ``site=f'angular_n{n}'``, stat ``angular_distance`` (and
    ``_lo``/``_hi``, ``angular_distance_norm``). The first-order estimate: ``site='importance'``, stat
    ``deletion_estimate`` (and ``_lo``/``_hi``); a pass without exact deletion gives its loss as a ``base``
    frame (``layer``, ``base_loss``). ``direction`` is ``'none'``. The step comes from a ``step``
    column when present (see :func:`importance_over_training`), else from ``step``."""
    cols = set(df.columns) - {"step"}
    if "step" in df.columns:
        steps = df["step"]
    elif step is not None:
        steps = pd.Series(step, index=df.index)
    else:
        raise ValueError("to_long needs a step: pass step= or a frame with a 'step' column")
    parts: list[pd.DataFrame] = []

    def add(layer: pd.Series, site: pd.Series | str, stat: str, value: pd.Series, step_: pd.Series) -> None:
        parts.append(pd.DataFrame({"step": step_.to_numpy(), "layer": layer.to_numpy(),
                                   "site": site if isinstance(site, str) else site.to_numpy(),
                                   "stat": stat, "value": value.to_numpy()}))

    if cols == set(DELETION_COLUMNS):
        for stat, column in (("deletion_delta", "delta"), ("deletion_delta_lo", "delta_lo"),
                             ("deletion_delta_hi", "delta_hi"), ("deletion_loss", "loss_deleted")):
            add(df["layer"], IMPORTANCE_SITE, stat, df[column], steps)
    elif cols == set(ESTIMATE_COLUMNS):
        for stat, column in (("deletion_estimate", "estimate"), ("deletion_estimate_lo", "estimate_lo"),
                             ("deletion_estimate_hi", "estimate_hi")):
            add(df["layer"], IMPORTANCE_SITE, stat, df[column], steps)
    elif cols == set(INFLUENCE_COLUMNS):
        for stat, column in (("block_influence", "influence"), ("block_influence_lo", "influence_lo"),
                             ("block_influence_hi", "influence_hi")):
            add(df["layer"], IMPORTANCE_SITE, stat, df[column], steps)
    elif cols in (set(ANGULAR_COLUMNS), set(ANGULAR_COLUMNS) | {"distance_norm"}):
        site = ANGULAR_PREFIX + df["n"].astype(int).astype(str)
        for stat, column in (("angular_distance", "distance"), ("angular_distance_lo", "distance_lo"),
                             ("angular_distance_hi", "distance_hi"), ("angular_distance_norm", "distance_norm")):
            if column in cols:
                add(df["layer"], site, stat, df[column], steps)
    elif cols != {"layer", "base_loss"}:  # a pass without exact deletion: its base loss alone
        raise ValueError(f"not a layer-importance frame: columns {sorted(df.columns)}")
    if "base_loss" in cols:  # the full model's loss, once per step
        base = pd.DataFrame({"step": steps, "base_loss": df["base_loss"]}).drop_duplicates("step")
        add(pd.Series(MODEL_LAYER, index=base.index), MODEL_SITE, "val_loss", base["base_loss"], base["step"])
    out = pd.concat(parts, ignore_index=True)
    out["run_id"] = run_id
    out["direction"] = "none"
    return as_table_frame(out)
