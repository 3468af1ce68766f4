"""Regressions of the performance design (no timings; speed is measured by benchmarks/).

- A step the schedule does not record runs no hook at all, in a real ``train()`` with probes every 10
  steps (the observer protocol with a hand-made schedule is covered in ``tests/test_probes.py``).
- ``train(compile=True)`` with probes on compiles exactly the graphs it compiles without probes (the
  hooks never enter the compiled graph, so recorded steps neither recompile nor trace statistics
  code) and agrees with an eager run step for step, probe rows included.
- The README's pattern for a compiled model in a user's loop (eager module on recorded steps)
  compiles one graph.
- The probe writer's memory is bounded by ``flush_rows`` (plus one step's rows), during training and
  against a brute-force model of when chunks are written.
- ``load_run``'s de-duplication, which only compares rows of steps that several chunks share, gives
  what a plain pandas ``drop_duplicates`` over all chunks gives.
- The depth-profile figures draw aggregates: the number of points does not grow with the number of
  recorded steps.
"""

from __future__ import annotations

import importlib
from collections import Counter
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from gpas_probe.config import ModelConfig, TrainConfig, get_preset
from gpas_probe.plots import make_figure
from gpas_probe.probes import ProbeConfig
from gpas_probe.store import COLUMNS, KEY_COLUMNS, PROBES_DIR, ProbeWriter, load_run

# the package re-exports the function train(), which hides the module of the same name
train_mod = importlib.import_module("gpas_probe.training")


def _tiny_train(steps: int, **kw) -> TrainConfig:
    return TrainConfig(**{**get_preset("tiny").train, "steps": steps, "device": "cpu", "eval_every": 5, **kw})


def _hooks_on(model: torch.nn.Module) -> int:
    n = 0
    for m in model.modules():
        n += len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) + len(m._backward_pre_hooks)
    for p in model.parameters():
        n += len(p._post_accumulate_grad_hooks or {}) + len(p._backward_hooks or {})
    return n


# -- no hook on unrecorded steps, in a real training run ---------------------------------------------
def test_unrecorded_steps_of_a_real_run_carry_no_hook_and_run_no_hook_code(monkeypatch, tmp_path) -> None:
    current = {"step": 0}
    calls: Counter[int] = Counter()  # step -> hook function calls, whoever registered them

    def counted(fn):
        def wrapper(*args, **kwargs):
            calls[current["step"]] += 1
            return fn(*args, **kwargs)
        return wrapper

    def counting(register):
        def patched(self, hook, *args, **kwargs):
            return register(self, counted(hook), *args, **kwargs)
        return patched

    for cls, name in ((torch.nn.Module, "register_forward_hook"), (torch.nn.Module, "register_forward_pre_hook"),
                      (torch.nn.Module, "register_full_backward_hook"), (torch.Tensor, "register_hook"),
                      (torch.Tensor, "register_post_accumulate_grad_hook")):
        monkeypatch.setattr(cls, name, counting(getattr(cls, name)))

    models: list[torch.nn.Module] = []
    real_build = train_mod.build_model
    monkeypatch.setattr(train_mod, "build_model", lambda cfg: models.append(real_build(cfg)) or models[-1])
    hooks_after_backward: dict[int, int] = {}

    class Spy:  # called before the probe's own observer methods, on the same step
        def begin_step(self, step: int) -> None:
            current["step"] = step

        def after_backward(self, step: int) -> None:  # the probe armed (or not) this step's forward
            hooks_after_backward[step] = _hooks_on(models[0])

        def end_step(self, info) -> None:
            current["step"] = 0  # between steps (the probe's end_step, evaluation, checkpoints)

    steps = 25
    train_mod.train(ModelConfig.from_preset("tiny", gpas=True), _tiny_train(steps), tmp_path / "run",
                    observers=[Spy()], probe=ProbeConfig(every=10))

    recorded = {1, 10, 20}
    assert sorted(hooks_after_backward) == list(range(1, steps + 1))
    assert {s for s, n in hooks_after_backward.items() if n > 0} == recorded
    assert {s for s, n in calls.items() if n > 0 and s != 0} == recorded  # no hook code on other steps
    assert all(calls[s] > hooks_after_backward[s] for s in recorded)  # forward, tensor and parameter hooks ran
    assert _hooks_on(models[0]) == 0
    frame = load_run(tmp_path / "run")
    assert set(frame[frame.layer >= 0].step) == recorded
    assert set(frame[frame.layer < 0].step) == set(range(1, steps + 1))  # model rows (host values) on every step
    assert set(frame[frame.stat == "val_loss"].step) == {5, 10, 15, 20, 25}


# -- torch.compile with probes on ------------------------------------------------------------------
def _compiled_run(tmp_path: Path, name: str, compile: bool, probe: ProbeConfig | None) -> tuple[int, object]:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    cfg = ModelConfig(**{**get_preset("tiny").model, "num_layers": 2, "gpas": True})
    result = train_mod.train(cfg, _tiny_train(6, eval_every=3, compile=compile), tmp_path / name, probe=probe)
    return counters["stats"]["unique_graphs"], result


def test_compile_with_probes_compiles_no_more_graphs_and_matches_eager(tmp_path) -> None:
    probe = ProbeConfig(every=2)
    plain_graphs, _ = _compiled_run(tmp_path, "plain", True, None)
    probed_graphs, compiled = _compiled_run(tmp_path, "compiled", True, probe)
    _, eager = _compiled_run(tmp_path, "eager", False, probe)
    assert plain_graphs > 0  # the counter does count this run's compilations
    assert probed_graphs == plain_graphs
    np.testing.assert_allclose([h.loss for h in compiled.history], [h.loss for h in eager.history], rtol=1e-4)
    a, b = load_run(tmp_path / "compiled"), load_run(tmp_path / "eager")
    key = ["step", "layer", "site", "direction", "stat"]
    a, b = (t.sort_values(key).reset_index(drop=True) for t in (a, b))
    pd.testing.assert_frame_equal(a[key], b[key])
    assert sorted(a.loc[a["direction"] == "fwd", "step"].unique()) == [1, 2, 4, 6]  # the schedule's steps
    np.testing.assert_allclose(a["value"], b["value"], rtol=1e-3, atol=1e-6)


def test_readme_pattern_for_a_compiled_model_in_a_users_loop_compiles_once(tmp_path) -> None:
    from torch._dynamo.utils import counters

    import gpas_probe

    torch._dynamo.reset()
    counters.clear()
    model = train_mod.build_model(ModelConfig(**{**get_preset("tiny").model, "num_layers": 2}))
    compiled = torch.compile(model, backend="eager")  # dynamo's tracing and guards, no code generation
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    x = torch.randint(0, 256, (2, 16))
    with gpas_probe.attach(model, out=tmp_path / "loop", every=2, optimizer=optimizer) as probe:
        for step in range(1, 7):
            net = model if probe.recording_step == step else compiled
            loss = net(x, x).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            probe.step(step, loss=loss)
    assert counters["stats"]["unique_graphs"] == 1
    assert sorted(load_run(tmp_path / "loop").query("direction == 'fwd'")["step"].unique()) == [1, 2, 4, 6]


# -- the writer's memory is bounded ----------------------------------------------------------------
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
    flush_rows = 300
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


# -- load_run de-duplication -----------------------------------------------------------------------
def _write_chunks(directory: Path, step_sets: list[list[int]], rng: np.random.Generator) -> None:
    for steps in step_sets:  # one writer (and chunk) per list, as a resumed run appends
        w = ProbeWriter(directory, "r", flush_rows=10**9, flush_steps=10**9)
        for step in steps:
            for layer in (-1, 0, 1):
                for site, stat in (("resid_post", "var"), ("attn", "shortcut_branch_ratio"), ("model", "loss")):
                    w.add(step, layer, site, "fwd" if site != "model" else "none", stat, float(rng.normal()))
            w.end_step()
        w.close()


@pytest.mark.parametrize("step_sets", [
    [[1, 2, 3], [4, 5], [6, 9]],  # a plain run: no step in two chunks
    [[1, 2, 3, 4, 5], [3, 4, 5, 6], [6, 7]],  # resumed twice from older checkpoints
    [[1, 3, 5, 7], [2, 4, 6], [5, 8]],  # ranges overlap; only step 5 is shared
    [[10, 11], [1, 2], [2, 10]],  # chunks out of step order
])
def test_load_run_dedupe_matches_pandas_drop_duplicates(tmp_path, step_sets: list[list[int]]) -> None:
    _write_chunks(tmp_path, step_sets, np.random.default_rng(len(step_sets[0])))
    raw = pd.concat([pq.read_table(p).to_pandas() for p in sorted(tmp_path.glob("part-*.parquet"))],
                    ignore_index=True)[list(COLUMNS)]
    reference = raw.drop_duplicates(KEY_COLUMNS, keep="last").reset_index(drop=True)
    got = load_run(tmp_path)
    pd.testing.assert_frame_equal(got.astype({c: object for c in ("run_id", "site", "direction", "stat")}),
                                  reference.astype({c: object for c in ("run_id", "site", "direction", "stat")}))
    assert all(pd.api.types.is_string_dtype(got[c]) for c in ("run_id", "site", "direction", "stat"))
    assert len(load_run(tmp_path, dedupe=False)) == len(raw)


# -- plots aggregate before drawing ----------------------------------------------------------------
def _table(n_steps: int, layers: int = 6) -> pd.DataFrame:
    rng = np.random.default_rng(n_steps)
    rows = []
    for step in range(1, n_steps + 1):
        for layer in range(layers):
            for _ in range(2):  # every statistic twice (a resumed run loaded with dedupe=False)
                rows += [("r", step, layer, "resid_post", d, stat, float(rng.uniform(0.5, 2.0)))
                         for d in ("fwd", "bwd") for stat in ("var", "rms")]
                rows += [("r", step, layer, sub, "fwd", "shortcut_branch_ratio", float(rng.uniform(1, 9)))
                         for sub in ("attn", "mlp")]
                rows.append(("r", step, layer, "params", "none", "grad_norm", float(rng.uniform(0.1, 1))))
    return pd.DataFrame(rows, columns=list(COLUMNS))


def _points(fig: plt.Figure) -> int:
    return sum(len(line.get_xdata()) for ax in fig.axes for line in ax.get_lines())


@pytest.mark.parametrize("kind", ["variance", "ratio", "grad"])
def test_depth_figures_draw_as_many_points_for_many_steps_as_for_few(kind: str) -> None:
    few, many = make_figure(kind, _table(20)), make_figure(kind, _table(400))
    try:
        assert 0 < _points(few) == _points(many) <= 8 * 6 * 3  # at most 8 steps x 6 layers x 3 panels
    finally:
        plt.close(few)
        plt.close(many)
