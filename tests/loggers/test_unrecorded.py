"""With loggers attached, an unrecorded step still runs no hook and no probe code at all, and the loggers
get a summary on recorded steps only, made of plain host numbers (no tensor reaches a sink, so a sink
reads nothing from the device); a sink that fails is reported and dropped while the table goes on."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from helpers import built_models, count_hook_calls, hooks_on

import gpas_probe.training as train_mod
from gpas_probe.config import ModelConfig, TrainConfig, get_preset
from gpas_probe.loggers import LogConfig, Loggers
from gpas_probe.probes import ProbeConfig
from gpas_probe.store import load_run


class Recorder:
    """A sink of our own: what it was given, and when."""

    def __init__(self, current: dict[str, int]) -> None:
        self.current, self.calls, self.closed = current, [], False

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.calls.append((step, self.current["step"], metrics))

    def close(self) -> None:
        self.closed = True


def test_unrecorded_steps_run_no_hook_and_log_nothing_with_loggers(monkeypatch, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    current = {"step": 0}
    calls = count_hook_calls(monkeypatch, current)  # step -> hook function calls, whoever registered them
    ends: list[int] = []
    real_end = Loggers.end_step
    monkeypatch.setattr(Loggers, "end_step", lambda self, step: (ends.append(step), real_end(self, step))[1])

    models = built_models(monkeypatch)
    hooks_after_backward: dict[int, int] = {}

    class Spy:  # called before the probe's own observer methods, on the same step
        def begin_step(self, step: int) -> None:
            current["step"] = step

        def after_backward(self, step: int) -> None:
            hooks_after_backward[step] = hooks_on(models[0])

        def end_step(self, info) -> None:
            current["step"] = -info.step  # the probe's end_step (and its loggers) run after this

    recorder = Recorder(current)
    steps = 25
    tc = TrainConfig(**{**get_preset("tiny").train, "steps": steps, "device": "cpu", "eval_every": 5})
    train_mod.train(ModelConfig.from_preset("tiny", gpas=True), tc, tmp_path / "run", observers=[Spy()],
                    probe=ProbeConfig(every=10), log_to=LogConfig(to=("tensorboard", recorder)))

    recorded = {1, 10, 20}
    assert {s for s, n in hooks_after_backward.items() if n > 0} == recorded
    assert {s for s, n in calls.items() if n > 0 and s > 0} == recorded  # no hook code on other steps
    assert hooks_on(models[0]) == 0
    assert ends == [1, 10, 20]  # the loggers are not even called on other steps
    assert [(step, at) for step, at, _ in recorder.calls] == [(1, -1), (10, -10), (20, -20)]
    assert recorder.closed
    for _, _, metrics in recorder.calls:
        assert metrics and all(type(v) is float for v in metrics.values())  # host numbers, no tensor
    frame = load_run(tmp_path / "run")
    assert set(frame[frame.layer >= 0].step) == recorded
    assert set(frame[frame.layer < 0].step) == set(range(1, steps + 1))  # model rows on every step, as before
    assert "gpas/model/val_loss" in recorder.calls[1][2]  # step 10 was evaluated: its summary has val_loss


class Failing:
    def __init__(self) -> None:
        self.calls = 0

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.calls += 1
        raise ConnectionError("the server went away")

    def close(self) -> None:
        pass


def test_a_failing_sink_is_reported_once_and_the_table_goes_on(tmp_path: Path, caplog) -> None:
    from logger_readback import expected_summaries, plain_loop

    failing, recorder = Failing(), Recorder({"step": 0})
    with caplog.at_level(logging.WARNING, logger="gpas_probe.loggers"):
        frame = plain_loop(tmp_path / "run", [failing, recorder])
    assert failing.calls == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "Failing: logging step 1 failed (the server went away)" in warnings[0]
    want = expected_summaries(frame)
    assert [step for step, _, _ in recorder.calls] == sorted(want) == [1, 2, 4]
    assert all(metrics == want[step] for step, _, metrics in recorder.calls)
