"""The probe writer: its memory is bounded by ``flush_rows`` (plus one step's rows), during training and
against a brute-force model of when chunks are written."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

import gpas_probe.training as train_mod
from gpas_probe.config import ModelConfig, TrainConfig, get_preset
from gpas_probe.probes import ProbeConfig
from gpas_probe.store import PROBES_DIR, ProbeWriter, load_run


def _tiny_train(steps: int, **kw) -> TrainConfig:
    return TrainConfig(**{**get_preset("tiny").train, "steps": steps, "device": "cpu", "eval_every": 5, **kw})


def test_writer_buffer_stays_bounded_while_training(monkeypatch, tmp_path) -> None:
    seen: list[tuple[str, int, int]] = []  # (event, buffered rows, flush_rows)
    real_add, real_end = ProbeWriter.add, ProbeWriter.end_step

    def add(self, *row):
        real_add(self, *row)
        seen.append(("add", self.buffered_rows, self.flush_rows))

    def end_step(self):
        real_end(self)
        seen.append(("end", self.buffered_rows, self.flush_rows))

    monkeypatch.setattr(ProbeWriter, "add", add)
    monkeypatch.setattr(ProbeWriter, "end_step", end_step)
    flush_rows = 1000
    train_mod.train(ModelConfig.from_preset("tiny", gpas=True), _tiny_train(12), tmp_path / "run",
                    probe=ProbeConfig(every=1, flush_rows=flush_rows, flush_steps=1000))

    frame = load_run(tmp_path / "run", dedupe=False)
    per_step = frame.groupby("step").size()
    assert per_step.min() > 100 and per_step.max() < flush_rows  # several steps per chunk
    assert all(f == flush_rows for _, _, f in seen)
    assert max(b for e, b, _ in seen if e == "end") < flush_rows
    assert max(b for _, b, _ in seen) <= flush_rows - 1 + per_step.max()
    parts = sorted((tmp_path / "run" / PROBES_DIR).glob("part-*.parquet"))
    sizes = [pq.read_metadata(p).num_rows for p in parts]
    assert len(parts) >= 4 and sum(sizes) == len(frame)
    assert all(flush_rows <= s < flush_rows + per_step.max() for s in sizes[:-1])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_writer_chunks_follow_flush_rows_and_flush_steps(tmp_path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    flush_rows, flush_steps = int(rng.integers(20, 60)), int(rng.integers(2, 6))
    rows_per_step = rng.integers(0, 30, size=40)
    w = ProbeWriter(tmp_path, "r", flush_rows=flush_rows, flush_steps=flush_steps)
    expected, pending, steps, peak = [], 0, 0, 0
    for step, n in enumerate(rows_per_step, start=1):
        for i in range(n):
            w.add(step, i, "resid_post", "fwd", "var", float(i))
            peak = max(peak, w.buffered_rows)
        w.end_step()
        pending, steps = pending + n, steps + 1  # brute force: the rule as documented
        if pending >= flush_rows or steps >= flush_steps:
            if pending:
                expected.append(pending)
            pending, steps = 0, 0
        assert w.buffered_rows == pending < flush_rows
    w.close()
    if pending:
        expected.append(pending)
    assert [pq.read_metadata(p).num_rows for p in w.parts] == expected
    assert peak <= flush_rows - 1 + rows_per_step.max()
