"""The training loop: determinism, learning, the lr schedule, exact resume, run-folder rules."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from gpas_probe.config import ModelConfig, NormScheme, TrainConfig
from gpas_probe.gpas import gate_parameters
from gpas_probe.training import StepInfo, lr_factor, train


def _cfgs(model: dict[str, Any] | None = None, **train_kw: Any) -> tuple[ModelConfig, TrainConfig]:
    tc = dict(steps=6, warmup=2, lr=3e-3, batch_size=4, seq_len=32, eval_every=0, eval_batches=1, device="cpu")
    return ModelConfig.from_preset("tiny", **(model or {})), TrainConfig(**{**tc, **train_kw})


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_same_seed_is_bit_identical() -> None:
    m, t = _cfgs({"gpas": True})
    a, b = train(m, t), train(m, t)
    _assert_same(_state(a.model), _state(b.model))
    assert [h.loss for h in a.history] == [h.loss for h in b.history]


def test_different_seed_differs() -> None:
    m, t = _cfgs()
    a = train(m, t)
    b = train(m, TrainConfig(**{**t.to_dict(), "seed": 1}))
    sa, sb = _state(a.model), _state(b.model)
    assert all(not torch.equal(sa[k], sb[k]) for k in sa if k.endswith("proj.weight"))


def test_loss_decreases() -> None:
    m, t = _cfgs({"gpas": True}, steps=30, warmup=3)
    result = train(m, t)
    losses = [h.loss for h in result.history]
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert losses[0] == pytest.approx(math.log(256), rel=0.1)  # byte-level, near-uniform at init
    assert last < first - 0.5, (first, last)
    assert result.final_val_loss is not None and result.final_val_loss < losses[0] - 0.5
    gates = [float(p.detach()) for p in gate_parameters(result.model)]
    assert gates and all(g != 0.0 for g in gates)  # the gates learn


def _hand_lr_factor(step: int, warmup: int, steps: int, floor: float) -> float:
    if step <= warmup:
        return step / warmup
    progress = (step - warmup) / (steps - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def test_lr_factor_formula() -> None:
    cfg = TrainConfig(steps=100, warmup=10, min_lr_ratio=0.1)
    for step in (1, 5, 10, 11, 30, 55, 80, 99, 100):
        assert lr_factor(step, cfg) == pytest.approx(_hand_lr_factor(step, 10, 100, 0.1), abs=1e-12), step
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(55, cfg) == pytest.approx(0.55)  # halfway down the cosine: (1 + 0.1) / 2
    assert lr_factor(100, cfg) == pytest.approx(0.1)
    factors = [lr_factor(s, cfg) for s in range(1, 101)]
    assert all(a < b for a, b in zip(factors[:9], factors[1:10], strict=True))  # warmup rises
    assert all(a > b for a, b in zip(factors[9:99], factors[10:100], strict=True))  # cosine falls
    assert lr_factor(5, TrainConfig(steps=20, warmup=0)) == pytest.approx(_hand_lr_factor(5, 0, 20, 0.1))


def test_training_uses_the_schedule() -> None:
    m, t = _cfgs(steps=9, warmup=3, lr=2e-3)
    seen: list[StepInfo] = []
    train(m, t, callback=seen.append)
    assert [h.step for h in seen] == list(range(1, 10))
    for h in seen:
        assert h.lr == pytest.approx(2e-3 * _hand_lr_factor(h.step, 3, 9, 0.1), rel=1e-12), h.step
    assert seen[-1].lr == pytest.approx(2e-4)


def test_resume_is_bit_identical(tmp_path: Path) -> None:
    m, t10 = _cfgs({"gpas": True, "norm": "sandwich"}, steps=10, warmup=5, checkpoint_every=5)
    full = train(m, t10, tmp_path / "full")
    ckpts = sorted(p.name for p in (tmp_path / "full" / "checkpoints").iterdir())
    assert ckpts == ["step_000005", "step_000010"]

    # Interrupted after step 7 (the last checkpoint is step 5), then resumed to the end.
    class Stop(Exception):
        pass

    def stop_at_7(info: StepInfo) -> None:
        if info.step == 7:
            raise Stop

    with pytest.raises(Stop):
        train(m, t10, tmp_path / "killed", callback=stop_at_7)
    resumed = train(m, t10, tmp_path / "killed", resume=True)
    assert [h.step for h in resumed.history] == [6, 7, 8, 9, 10]
    assert [h.loss for h in resumed.history] == [h.loss for h in full.history[5:]]
    _assert_same(_state(full.model), _state(resumed.model))

    # A shorter run extended with --resume and more steps keeps its own schedule: its cosine ended at
    # step 5, and steps 6-10 run at the final rate (min_lr_ratio x peak), not on a 10-step cosine.
    _, t5 = _cfgs({"gpas": True, "norm": "sandwich"}, steps=5, warmup=5, checkpoint_every=5)
    short = train(m, t5, tmp_path / "short")
    extended = train(m, t10, tmp_path / "short", resume=True)
    assert extended.step == 10 and [h.step for h in extended.history] == [6, 7, 8, 9, 10]
    final = t10.lr * t10.min_lr_ratio
    assert [h.lr for h in extended.history] == pytest.approx([final] * 5)
    assert [h.lr for h in short.history] == pytest.approx([t5.lr * lr_factor(s, t5) for s in range(1, 6)])
    assert full.history[5].lr > final * 1.5  # the 10-step run is still decaying at step 6
    meta = json.loads((tmp_path / "short" / "run.json").read_text())
    assert meta["train_config"]["steps"] == 10 and meta["train_config"]["schedule_steps"] == 5
    assert meta["resumes"][0]["from_step"] == 5


def test_resume_of_finished_run_does_nothing(tmp_path: Path) -> None:
    m, t = _cfgs(steps=3)
    first = train(m, t, tmp_path / "r")
    again = train(m, t, tmp_path / "r", resume=True)
    assert again.history == [] and again.step == 3
    _assert_same(_state(first.model), _state(again.model))


def test_existing_run_dir_rules(tmp_path: Path) -> None:
    m, t = _cfgs(steps=2)
    train(m, t, tmp_path / "r")
    with pytest.raises(FileExistsError, match="overwrite"):
        train(m, t, tmp_path / "r")
    (tmp_path / "r" / "stale.txt").write_text("x")
    train(m, t, tmp_path / "r", overwrite=True)
    assert not (tmp_path / "r" / "stale.txt").exists()

    other_model = ModelConfig.from_preset("tiny", norm="post")
    with pytest.raises(ValueError, match="model configuration"):
        train(other_model, t, tmp_path / "r", resume=True)
    with pytest.raises(ValueError, match="lr"):
        train(m, TrainConfig(**{**t.to_dict(), "lr": 1e-2}), tmp_path / "r", resume=True)


@pytest.mark.parametrize("scheme", [s.value for s in NormScheme])
def test_every_scheme_trains(scheme: str) -> None:
    for gpas in ({}, {"gpas": True}, {"gpas": True, "gpas_granularity": "sublayer", "gpas_mode": "naive"}):
        m, t = _cfgs({"norm": scheme, **gpas}, steps=3, warmup=1, gate_clip=0.5)
        result = train(m, t)
        assert len(result.history) == 3
        assert all(math.isfinite(h.loss) and math.isfinite(h.grad_norm) for h in result.history)
        assert result.final_val_loss is not None and math.isfinite(result.final_val_loss)
        if gpas:
            assert all(float(p.detach()) != 0.0 for p in gate_parameters(result.model))


def test_fixed_gates_stay_fixed() -> None:
    m, t = _cfgs({"gpas": True, "gpas_learnable": False, "gpas_init": 0.25}, steps=3)
    result = train(m, t)
    assert all(float(p) == 0.25 for p in gate_parameters(result.model))
