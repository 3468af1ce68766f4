"""Shared test set-up."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)


def write_corpus(directory: Path, seed: int, words: int) -> Path:
    """A small deterministic text corpus (faster to load than the built-in one)."""
    rng = np.random.default_rng(seed)
    vocab = ["alpha", "beta", "gamma", "delta", "residual", "stream", "layer", "norm", "gate", "scale"]
    path = directory / "corpus.txt"
    path.write_text(" ".join(rng.choice(vocab, size=words)))
    return path


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models run fastest on one thread, and do not stall when other processes share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
