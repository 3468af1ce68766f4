"""Training with probes on: a step the schedule does not record runs no hook at all, in a real ``train()`` with
probes every 10 steps (the observer protocol with a hand-made schedule is covered in ``tests/probes/``)."""

from __future__ import annotations

from collections import Counter

import torch

import gpas_probe.training as train_mod
from gpas_probe.config import ModelConfig, TrainConfig, get_preset
from gpas_probe.probes import ProbeConfig
from gpas_probe.store import load_run


def _tiny_train(steps: int, **kw) -> TrainConfig:
    return TrainConfig(**{**get_preset("tiny").train, "steps": steps, "device": "cpu", "eval_every": 5, **kw})


def _hooks_on(model: torch.nn.Module) -> int:
    n = 0
    for m in model.modules():
        n += len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) + len(m._backward_pre_hooks)
    for p in model.parameters():
        n += len(p._post_accumulate_grad_hooks or {}) + len(p._backward_hooks or {})
    return n


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
