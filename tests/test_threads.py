"""The CPU thread policy (gpas_probe.threads): as many threads as cores are free, followed as other work
comes and goes; a count given wins; train and profile apply it and say so."""

from __future__ import annotations

import logging
import subprocess
import sys
import time

import pytest
import torch

import gpas_probe.threads as threads_mod
from gpas_probe import ModelConfig, TrainConfig, train
from gpas_probe.threads import ThreadPolicy, busy_cores, choose_threads, own_running, use_threads


@pytest.mark.parametrize(("cores", "busy", "expected"), [(2, 0, 2), (8, 3, 5), (2, 1, 1), (2, 5, 1), (1, 0, 1)])
def test_policy_takes_the_free_cores_and_at_least_one(cores, busy, expected) -> None:
    n, why = choose_threads(cores=cores, busy=busy)
    assert n == expected and why


def test_busy_cores_sees_other_processes_but_not_this_ones_threads() -> None:
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        time.sleep(0.5)
        assert busy_cores() >= 2
    finally:
        for p in loops:
            p.kill()
            p.wait()
    assert own_running() >= 1


def test_a_run_follows_the_free_cores_once_two_checks_agree(monkeypatch) -> None:
    busy = [0]
    monkeypatch.setattr(threads_mod, "usable_cores", lambda: 4)
    monkeypatch.setattr(threads_mod, "busy_cores", lambda **_: busy[0])
    clock = [100.0]
    monkeypatch.setattr(threads_mod.time, "monotonic", lambda: clock[0])
    policy = ThreadPolicy(0, every_s=5.0)
    assert policy.apply() == 4 and torch.get_num_threads() == 4
    busy[0] = 3  # another job starts
    clock[0] += 1.0
    policy.check()
    assert torch.get_num_threads() == 4  # not yet due
    clock[0] += 5.0
    policy.check()
    assert torch.get_num_threads() == 4  # one check alone does not change it
    clock[0] += 5.0
    policy.check()
    assert torch.get_num_threads() == 1
    busy[0] = 0  # it ended
    for _ in range(2):
        clock[0] += 5.0
        policy.check()
    assert torch.get_num_threads() == 4
    fixed = ThreadPolicy(2)
    fixed.apply()
    busy[0] = 3
    for _ in range(3):
        clock[0] += 5.0
        fixed.check()
    assert torch.get_num_threads() == 2


def test_a_count_given_wins_and_a_gpu_is_left_alone() -> None:
    assert use_threads(3) and torch.get_num_threads() == 3
    torch.set_num_threads(2)
    use_threads(0, device="cuda")
    assert torch.get_num_threads() == 2
    with pytest.raises(ValueError, match="threads must be 0"):
        use_threads(-1)
    with pytest.raises(ValueError, match="threads must be 0"):
        TrainConfig(threads=-2)


def test_train_applies_the_policy_and_logs_it(caplog, monkeypatch) -> None:
    monkeypatch.setattr(threads_mod, "usable_cores", lambda: 2)
    monkeypatch.setattr(threads_mod, "busy_cores", lambda **_: 1)
    config = TrainConfig(steps=2, warmup=1, batch_size=2, seq_len=16, eval_every=0, eval_batches=1, device="cpu")
    torch.set_num_threads(2)
    with caplog.at_level(logging.INFO, logger="gpas_probe.threads"):
        train(ModelConfig.from_preset("tiny"), config, progress="off")
    lines = [r.getMessage() for r in caplog.records if r.name == "gpas_probe.threads"]
    assert lines == ["using 1 CPU thread(s): 1 of 2 cores busy with other work"]
    assert torch.get_num_threads() == 1
    train(ModelConfig.from_preset("tiny"), TrainConfig(**{**config.__dict__, "threads": 2}), progress="off")
    assert torch.get_num_threads() == 2
