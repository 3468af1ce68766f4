"""Checks of a run folder shared by the crash, fault-injection and concurrency tests: every file reads,
no temporary is left, each (step, layer, site, direction, stat) appears once."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import torch

from gpas_probe.checkpoints import load, step_checkpoints
from gpas_probe.probes import load_run
from gpas_probe.store import COLUMNS, KEY_COLUMNS


def check_every_file_reads(run: Path) -> int:
    """Every whole file of a (possibly killed) run reads; temporary leftovers are ignored by readers.
    Returns the step of the latest checkpoint (0 if none)."""
    json.loads((run / "run.json").read_text())
    probes = run / "probes"
    if probes.is_dir():
        json.loads((probes / "_meta.json").read_text())
        for chunk in sorted(probes.glob("part-*.parquet")):
            assert pq.read_table(chunk).column_names == list(COLUMNS), chunk
        pd.read_parquet(probes)  # plain pandas skips the hidden temporaries
    ckpts = step_checkpoints(run)
    for ckpt in ckpts:
        loaded = load(ckpt)
        state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
        assert state["step"] == loaded.step == int(ckpt.name.split("_")[1])
    last = ckpts[-1].name if ckpts else None
    if last is not None and probes.is_dir():  # the table on disk reaches the latest checkpoint
        steps = set(load_run(run).step)
        assert set(range(1, int(last.split("_")[1]) + 1)) <= steps
    return int(last.split("_")[1]) if last else 0


def temporaries(run: Path) -> list[Path]:
    return [p for p in run.rglob(".*") if ".tmp" in p.name or ".old-" in p.name]


def assert_one_row_per_key(frame: pd.DataFrame, steps: int) -> None:
    assert not frame.duplicated(KEY_COLUMNS).any(), frame[frame.duplicated(KEY_COLUMNS, keep=False)].head()
    assert sorted(frame.step.unique()) == list(range(1, steps + 1))
    per_step = frame[frame.stat != "val_loss"].groupby("step").apply(
        lambda g: frozenset(zip(g.layer, g.site, g.direction, g.stat, strict=True)), include_groups=False)
    assert per_step.nunique() == 1  # every step has the same statistics
