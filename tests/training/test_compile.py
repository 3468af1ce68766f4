"""``train(compile=True)`` with probes on compiles exactly the graphs it compiles without probes (the hooks never
enter the compiled graph, so recorded steps neither recompile nor trace statistics code) and agrees with an eager
run step for step, probe rows included; the README's pattern for a compiled model in a user's loop (the eager
module on recorded steps) compiles one graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

import gpas_probe.training as train_mod
from gpas_probe.config import ModelConfig, TrainConfig, get_preset
from gpas_probe.probes import ProbeConfig
from gpas_probe.store import load_run


def _tiny_train(steps: int, **kw) -> TrainConfig:
    return TrainConfig(**{**get_preset("tiny").train, "steps": steps, "device": "cpu", "eval_every": 5, **kw})


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
