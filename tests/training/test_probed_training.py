"""Training with probes on: a step the schedule does not record runs no hook at all, in a real ``train()`` with
probes every 10 steps (the observer protocol with a hand-made schedule is covered in ``tests/probes/``)."""

from __future__ import annotations

from helpers import built_models, count_hook_calls, hooks_on

import gpas_probe.training as train_mod
from gpas_probe.config import ModelConfig, TrainConfig, get_preset
from gpas_probe.probes import ProbeConfig
from gpas_probe.store import load_run


def _tiny_train(steps: int, **kw) -> TrainConfig:
    return TrainConfig(**{**get_preset("tiny").train, "steps": steps, "device": "cpu", "eval_every": 5, **kw})


def test_unrecorded_steps_of_a_real_run_carry_no_hook_and_run_no_hook_code(monkeypatch, tmp_path) -> None:
    current = {"step": 0}
    calls = count_hook_calls(monkeypatch, current)  # step -> hook function calls, whoever registered them

    models = built_models(monkeypatch)
    hooks_after_backward: dict[int, int] = {}

    class Spy:  # called before the probe's own observer methods, on the same step
        def begin_step(self, step: int) -> None:
            current["step"] = step

        def after_backward(self, step: int) -> None:  # the probe armed (or not) this step's forward
            hooks_after_backward[step] = hooks_on(models[0])

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
    assert hooks_on(models[0]) == 0
    frame = load_run(tmp_path / "run")
    assert set(frame[frame.layer >= 0].step) == recorded
    assert set(frame[frame.layer < 0].step) == set(range(1, steps + 1))  # model rows (host values) on every step
    assert set(frame[frame.stat == "val_loss"].step) == {5, 10, 15, 20, 25}
