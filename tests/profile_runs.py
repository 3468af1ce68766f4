"""What the profile tests share: a small text, a tiny GPAS run with checkpoints at steps 2 and 4, and a
short evaluation text whose last batch is padded."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from gpas_probe.config import ModelConfig, TrainConfig, get_preset
from gpas_probe.training import train

WORDS = "the cat sat on a mat while dogs ran far away from home and birds sang loud songs".split()
SEQ, BS, NB = 16, 2, 3  # evaluation windows of the brute-force tests


def words_text(n_lines: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return "\n".join(" ".join(rng.choice(WORDS) for _ in range(10)) for _ in range(n_lines))


def train_run(root: Path) -> Path:
    """A tiny GPAS run trained by gpas_probe.train, with checkpoints at steps 2 and 4."""
    data = root / "train.txt"
    data.write_text(words_text(1500))
    tc = TrainConfig(**{**get_preset("tiny").train, "steps": 4, "checkpoint_every": 2, "data": str(data),
                        "device": "cpu"})
    train(ModelConfig.from_preset("tiny", gpas=True), tc, root / "myrun")
    return root / "myrun"


def write_short_text(folder: Path) -> Path:
    """70 bytes: 4 full windows of 16 targets and a tail of 5, so the last of 3 batches is padded."""
    p = folder / "short.txt"
    p.write_bytes(words_text(5).encode()[:70])
    return p


def word_tokenizer(text: str):
    """A word-level ``tokenizers.Tokenizer`` trained on ``text`` (skips the test without the package)."""
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.train_from_iterator([text], tokenizers.trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    return tok
