"""Shared test set-up: one thread, and every test closes its figures and leaves matplotlib's style alone.
Shared helpers are modules beside this file (``helpers``, ``probe_reference``, ``hf_models``)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import pytest
import torch

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from profile_runs import train_run, write_short_text  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models run fastest on one thread, and do not stall when other processes share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _back_to_one_thread():
    """A test whose training or profile chose more threads (gpas_probe.threads) leaves one behind."""
    yield
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _close_and_check_rc():
    """Every test closes its figures, and nothing in the library changes matplotlib's global style."""
    before = dict(matplotlib.rcParams)
    yield
    plt.close("all")
    after = dict(matplotlib.rcParams)
    changed = sorted(k for k in before if before[k] != after[k] and not (
        isinstance(before[k], float) and math.isnan(before[k])))
    assert not changed, f"rcParams changed: {changed}"


@pytest.fixture(scope="session")
def tiny_gpas_run(tmp_path_factory) -> Path:
    """A tiny GPAS run with checkpoints at steps 2 and 4 (``profile_runs.train_run``), trained once."""
    return train_run(tmp_path_factory.mktemp("train"))


@pytest.fixture(scope="session")
def short_text(tmp_path_factory) -> Path:
    """An evaluation text whose last batch is padded (``profile_runs.write_short_text``)."""
    return write_short_text(tmp_path_factory.mktemp("data"))
