"""Comparisons across seeds: a configuration's numbers are only as good as their seed-to-seed spread.

Runs group by configuration: the model and training settings they were started with, except the seed
and settings that do not change the training arithmetic (device, compile, how often to checkpoint or
evaluate). A group is named after its runs with the ``-seedN`` suffix ``gpas-probe train --seeds`` gives
them removed. Per group, :func:`seed_summary` reports the mean of each number of
:func:`~gpas_probe.analysis.summary.compare_runs` over its runs with a 95% interval for the final
validation loss (Student's t over seeds); :func:`paired_differences` compares every group with the first,
run by run for the seeds they share (the same seed means the same initial weights of shared parameters
and the same batches, so pairing removes that part of the noise).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gpas_probe.analysis.summary import compare_runs
from gpas_probe.intervals import mean_interval
from gpas_probe.store import read_meta

SEED_SUFFIX = re.compile(r"-seed\d+$")
#: Training settings that do not define a configuration.
NOT_CONFIGURATION = ("seed", "device", "compile", "checkpoint_every", "eval_every", "eval_batches")


def configuration(meta: Mapping[str, Any]) -> str | None:
    """A canonical text of a run's configuration (from its probe metadata), or None when not recorded."""
    model, train = meta.get("model_config"), meta.get("train_config")
    if not isinstance(model, dict) or not isinstance(train, dict):
        return None
    train = {k: v for k, v in train.items() if k not in NOT_CONFIGURATION}
    return json.dumps({"model": model, "train": train}, sort_keys=True, default=str)


def group_runs(metas: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """``run_id -> group name`` for runs whose metadata are given (in order): runs of one configuration
    share a group; a run without a recorded configuration is a group of its own."""
    names: dict[str, str] = {}
    out: dict[str, str] = {}
    for run, meta in metas.items():
        key = configuration(meta) or f"run:{run}"
        names.setdefault(key, SEED_SUFFIX.sub("", run))
        out[run] = names[key]
    return out


def seed_of(meta: Mapping[str, Any]) -> int | None:
    """The training seed a run's metadata records."""
    seed = (meta.get("train_config") or {}).get("seed")
    return int(seed) if isinstance(seed, (int, float)) else None


def seed_summary(data: pd.DataFrame, groups: Mapping[str, str], per_run: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per group (in order of first appearance): ``runs``, the mean over its runs of each
    :func:`compare_runs` number, and ``val_lo``/``val_hi``, the 95% interval of the mean final validation
    loss across seeds (NaN with one run). ``per_run``: ``compare_runs(data)``, when computed already."""
    per_run = compare_runs(data) if per_run is None else per_run
    per_run = per_run.assign(group=[groups.get(r, r) for r in per_run.index])
    rows = []
    for name, part in per_run.groupby("group", sort=False):
        val = part["final_val_loss"].to_numpy(dtype=float)
        iv = mean_interval(len(val), float(val.sum()), float((val * val).sum()))
        means = part.drop(columns="group").mean(numeric_only=True)
        rows.append({"group": name, "runs": len(part), **means.to_dict(), "val_lo": iv.lo, "val_hi": iv.hi})
    out = pd.DataFrame(rows).set_index("group")
    out["runs"] = out["runs"].astype(int)
    return out


def paired_differences(data: pd.DataFrame, groups: Mapping[str, str], seeds: Mapping[str, int | None],
                       per_run: pd.DataFrame | None = None) -> pd.DataFrame:
    """Each group against the first: the final validation loss of its run minus the first group's run of
    the same seed, averaged over the shared seeds, with its 95% interval; ``beyond_noise`` is True when the
    interval excludes zero. Columns ``pairs``, ``difference``, ``lo``, ``hi``, ``beyond_noise``.
    ``per_run``: ``compare_runs(data)``, when computed already."""
    val = (compare_runs(data) if per_run is None else per_run)["final_val_loss"]
    order = list(dict.fromkeys(groups[r] for r in val.index if r in groups))
    if len(order) < 2:
        return pd.DataFrame(columns=["pairs", "difference", "lo", "hi", "beyond_noise"])
    by_group: dict[str, dict[int, float]] = {}
    for run, value in val.items():
        seed = seeds.get(run)
        if run in groups and seed is not None:
            by_group.setdefault(groups[run], {})[seed] = float(value)
    base = by_group.get(order[0], {})
    rows = []
    for name in order[1:]:
        mine = by_group.get(name, {})
        diffs = np.array([mine[s] - base[s] for s in sorted(set(mine) & set(base))], dtype=float)
        iv = mean_interval(len(diffs), float(diffs.sum()), float((diffs * diffs).sum()))
        rows.append({"group": f"{name} - {order[0]}", "pairs": len(diffs), "difference": iv.estimate,
                     "lo": iv.lo, "hi": iv.hi, "beyond_noise": bool(len(diffs) > 1 and not math.isnan(iv.lo)
                                                                  and iv.excludes(0.0))})
    return pd.DataFrame(rows).set_index("group")


def run_groups(paths: Sequence[str | Path], run_ids: Sequence[str] | None = None
               ) -> tuple[dict[str, str], dict[str, int | None]]:
    """``(run_id -> group, run_id -> seed)`` of run folders, from their probe metadata; ``run_ids``
    replace the stored ids (as in :func:`gpas_probe.store.load_runs`)."""
    metas = {}
    for i, path in enumerate(paths):
        meta = read_meta(path)
        metas[str(meta.get("run_id", Path(path).name)) if run_ids is None else run_ids[i]] = meta
    return groups_and_seeds(metas)


def groups_and_seeds(metas: Mapping[str, Mapping[str, Any]]) -> tuple[dict[str, str], dict[str, int | None]]:
    """``(run_id -> group, run_id -> seed)`` from the probe metadata of each run id."""
    return group_runs(metas), {run: seed_of(meta) for run, meta in metas.items()}


def grouped(groups: Mapping[str, str]) -> bool:
    """Whether some group holds several runs (seeds to aggregate)."""
    return len(set(groups.values())) < len(groups)
