"""Corpora and batches: the built-in corpus, text and token files, deterministic batches."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from gpas_probe.config import ModelConfig, TrainConfig
from gpas_probe.data import Batches, Corpus, builtin_corpus, load_corpus, load_tokens
from gpas_probe.training import train


@pytest.fixture(scope="module")
def builtin() -> Corpus:
    return builtin_corpus()


def test_builtin_is_deterministic_bytes(builtin: Corpus) -> None:
    again = load_corpus("builtin")
    assert np.array_equal(builtin.train, again.train) and np.array_equal(builtin.val, again.val)
    assert builtin.vocab_size == 256
    assert builtin.train.dtype == np.uint8 and builtin.val.dtype == np.uint8
    assert len(builtin.train) > 1_000_000 and len(builtin.val) > 10_000
    assert 0.01 < len(builtin.val) / len(builtin.train) < 0.2
    assert b"def " in builtin.train[:200_000].tobytes()  # Python source, byte for byte


def test_builtin_split_is_by_file(builtin: Corpus) -> None:
    """A validation file's text is in the validation split and nowhere in the training split."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    train_bytes, val_bytes = builtin.train.tobytes(), builtin.val.tobytes()
    checked = {"val": 0, "train": 0}
    for path in sorted(root.glob("*.py")):  # top-level stdlib modules
        text = path.read_bytes()
        if len(text) < 4000:
            continue
        chunk = text[len(text) // 2: len(text) // 2 + 300]  # a distinctive piece from the middle
        side = "val" if zlib.crc32(path.name.encode()) % 20 == 0 else "train"
        if checked[side] >= 4:
            continue
        if side == "val":
            assert chunk in val_bytes and chunk not in train_bytes, path.name
        else:
            assert chunk in train_bytes and chunk not in val_bytes, path.name
        checked[side] += 1
    assert checked["val"] >= 1 and checked["train"] >= 1


def test_train_batches_pure_in_seed_and_step(builtin: Corpus) -> None:
    a, b = Batches(builtin, 4, 32, seed=3), Batches(builtin, 4, 32, seed=3)
    a.train(1), a.train(9)  # earlier calls do not change later batches
    xa, ya = a.train(5)
    xb, yb = b.train(5)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert xa.shape == ya.shape == (4, 32) and xa.dtype == torch.int64
    assert not torch.equal(xa, b.train(6)[0])
    assert not torch.equal(xa, Batches(builtin, 4, 32, seed=4).train(5)[0])


def test_targets_are_inputs_shifted(builtin: Corpus) -> None:
    x, y = Batches(builtin, 8, 64, seed=0).train(2)
    assert torch.equal(x[:, 1:], y[:, :-1])
    data = builtin.train.tobytes()
    for row_x, row_y in zip(x, y, strict=True):
        window = bytes(row_x.tolist()) + bytes([int(row_y[-1])])
        assert window in data  # a contiguous window of the corpus


def test_rank_slices_form_the_global_batch(builtin: Corpus) -> None:
    bs = 3
    per_rank, whole = Batches(builtin, bs, 16, seed=7), Batches(builtin, 2 * bs, 16, seed=7)
    for step in (1, 4):
        x0, y0 = per_rank.train(step, rank=0, world=2)
        x1, y1 = per_rank.train(step, rank=1, world=2)
        xg, yg = whole.train(step)
        assert x0.shape == (bs, 16)
        assert torch.equal(torch.cat([x0, x1]), xg) and torch.equal(torch.cat([y0, y1]), yg)
        assert not torch.equal(x0, x1)


def test_val_batches_fixed_and_seed_independent(builtin: Corpus) -> None:
    a, b = Batches(builtin, 2, 16, seed=0).val(3), Batches(builtin, 2, 16, seed=99).val(3)
    assert len(a) == 3
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and xa.shape == (2, 16)
        assert torch.equal(xa[:, 1:], ya[:, :-1])
        for row in xa:
            assert bytes(row.tolist()) in builtin.val.tobytes()


def test_text_file(tmp_path: Path) -> None:
    text = ("The quick brown fox jumps over the lazy dog. " * 80).encode() + "é\n".encode()
    f = tmp_path / "corpus.txt"
    f.write_bytes(text)
    c = load_corpus(f)
    n_val = int(len(text) * 0.05)
    assert c.vocab_size == 256
    assert c.train.tobytes() == text[:-n_val] and c.val.tobytes() == text[-n_val:]
    assert c.max_token == max(text)


def _windows_are_consecutive(x: torch.Tensor, y: torch.Tensor) -> None:
    """For a corpus 0, 1, 2, ... every row counts up by one and targets are inputs + 1."""
    assert torch.equal(y, x + 1)
    assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones_like(x[:, 1:]))


@pytest.mark.parametrize(("name", "dtype", "offset"), [
    ("tokens.npy", np.int32, 0), ("tokens.npy", np.uint16, 0), ("tokens.bin", np.uint16, 1000),
    ("tokens.u32.bin", np.uint32, 100_000),
])
def test_token_files(tmp_path: Path, name: str, dtype: type, offset: int) -> None:
    tokens = (np.arange(4000) + offset).astype(dtype)
    f = tmp_path / name
    np.save(f, tokens) if name.endswith(".npy") else tokens.tofile(f)
    loaded = load_tokens(f)
    assert np.array_equal(np.asarray(loaded, dtype=np.int64), tokens.astype(np.int64))
    c = load_corpus(f)
    assert c.vocab_size is None and c.max_token == 3999 + offset
    assert len(c.val) == 200 and int(c.val[0]) == 3800 + offset  # the last 5% held out
    batches = Batches(c, 4, 20, seed=0)
    x, y = batches.train(3)
    _windows_are_consecutive(x, y)
    assert int(y.max()) < 3800 + offset  # training rows never reach into the validation part
    for xv, yv in batches.val(2):
        _windows_are_consecutive(xv, yv)
        assert int(xv.min()) >= 3800 + offset


def test_bad_token_files(tmp_path: Path) -> None:
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x01\x02\x03")
    with pytest.raises(ValueError, match="multiple of 2"):
        load_tokens(odd)
    two_d = tmp_path / "two_d.npy"
    np.save(two_d, np.zeros((3, 4), dtype=np.int32))
    with pytest.raises(ValueError, match="1-D integer"):
        load_tokens(two_d)
    floats = tmp_path / "floats.npy"
    np.save(floats, np.zeros(100, dtype=np.float32))
    with pytest.raises(ValueError, match="1-D integer"):
        load_tokens(floats)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_corpus(tmp_path / "missing.txt")


def test_data_shorter_than_a_sequence(tmp_path: Path) -> None:
    f = tmp_path / "short.txt"
    f.write_bytes(b"x" * 400)  # 380 train bytes, 20 validation bytes
    c = load_corpus(f)
    with pytest.raises(ValueError, match="fewer than one sequence"):
        Batches(c, 2, 64)  # the validation split is too short
    g = tmp_path / "tiny.txt"
    g.write_bytes(b"abc")
    with pytest.raises(ValueError, match="train split has 2 tokens"):
        Batches(load_corpus(g), 1, 8)
    Batches(c, 2, 19)  # exactly one sequence + 1 fits


def test_train_refuses_tokens_beyond_vocab(tmp_path: Path) -> None:
    f = tmp_path / "big.u32.bin"
    np.arange(300, 1300, dtype=np.uint32).tofile(f)
    m = ModelConfig.from_preset("tiny")
    t = TrainConfig(steps=1, warmup=0, batch_size=2, seq_len=8, eval_batches=1, data=str(f), device="cpu")
    with pytest.raises(ValueError, match="vocabulary"):
        train(m, t)


def test_train_on_a_text_file(tmp_path: Path) -> None:
    f = tmp_path / "corpus.txt"
    f.write_bytes(bytes(range(32, 127)) * 50)
    m = ModelConfig.from_preset("tiny", num_layers=2)
    t = TrainConfig(steps=2, warmup=1, batch_size=2, seq_len=16, eval_batches=1, data=str(f), device="cpu")
    result = train(m, t)
    assert len(result.history) == 2 and result.final_val_loss is not None
