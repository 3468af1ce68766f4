"""The CPU thread policy (gpas_probe.threads): what it picks for the work and the free cores, that a
count given wins, and that train and profile apply it and say so."""

from __future__ import annotations

import logging
import subprocess
import sys
import time

import pytest
import torch

from gpas_probe import ModelConfig, TrainConfig, train
from gpas_probe.threads import NARROW, busy_cores, choose_threads, use_threads


@pytest.mark.parametrize(("hidden", "cores", "busy", "expected"), [
    (64, 2, 0, 1),  # narrow: one thread whatever the machine
    (NARROW - 1, 16, 0, 1),
    (NARROW, 2, 0, 2),  # wide enough, quiet: every core
    (512, 8, 3, 5),  # others keep 3 cores busy: the 5 free ones
    (512, 2, 1, 1),
    (512, 2, 5, 1),  # never fewer than one
    (None, 4, 0, 4),  # size unknown: the free cores
])
def test_policy_picks_threads_for_the_width_and_the_free_cores(hidden, cores, busy, expected) -> None:
    choice = choose_threads(hidden, cores=cores, busy=busy)
    assert choice.threads == expected
    assert choice.reason


def test_busy_cores_sees_processes_that_keep_cores_busy() -> None:
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        time.sleep(0.5)
        assert busy_cores() >= 2
    finally:
        for p in loops:
            p.kill()
            p.wait()


def test_a_count_given_wins_and_a_gpu_is_left_alone() -> None:
    assert use_threads(3, hidden_size=32) == 3 and torch.get_num_threads() == 3
    torch.set_num_threads(2)
    assert use_threads(0, hidden_size=1024, device="cuda") == 2 and torch.get_num_threads() == 2
    with pytest.raises(ValueError, match="threads must be 0"):
        use_threads(-1)
    with pytest.raises(ValueError, match="threads must be 0"):
        TrainConfig(threads=-2)


def test_train_applies_the_policy_and_logs_it_once(caplog) -> None:
    torch.set_num_threads(2)
    config = TrainConfig(steps=2, warmup=1, batch_size=2, seq_len=16, eval_every=0, eval_batches=1, device="cpu")
    with caplog.at_level(logging.INFO, logger="gpas_probe.threads"):
        train(ModelConfig.from_preset("tiny"), config, progress="off")
    lines = [r.getMessage() for r in caplog.records if r.name == "gpas_probe.threads"]
    assert lines == [f"using 1 CPU thread(s): hidden size 32 < {NARROW}: parallel regions gain little"]
    assert torch.get_num_threads() == 1
    train(ModelConfig.from_preset("tiny"), TrainConfig(**{**config.__dict__, "threads": 2}), progress="off")
    assert torch.get_num_threads() == 2
