"""Corpora and batches.

Sources (``TrainConfig.data``):

- ``"builtin"``: the running Python's standard-library source (``*.py``, tests excluded), read
  from disk, byte-level (vocabulary 256). Files whose path hashes to 0 mod 20 form the validation
  split, so the split is the same on every run and every machine with the same Python.
- a text file (any other suffix): byte-level, the last 5% of bytes held out for validation.
- a token file: ``.npy`` (any integer dtype) or ``.bin`` (raw uint16, or uint32 when the name ends
  in ``.u32.bin``), the last 5% held out.

Batches are a pure function of ``(seed, step)``, so a resumed run sees exactly the batches it would
have seen, and ranks of a distributed run slice one global batch between them.
"""

from __future__ import annotations

import logging
import os
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

BYTE_VOCAB = 256
VAL_FRACTION = 0.05
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__", "lib2to3"}


@dataclass
class Corpus:
    """Token streams (1-D integer arrays) for training and validation."""

    name: str
    train: np.ndarray
    val: np.ndarray
    vocab_size: int | None  # the vocabulary the tokens come from, when known (256 for bytes)

    @property
    def max_token(self) -> int:
        return int(max(self.train.max(initial=0), self.val.max(initial=0)))

    @property
    def min_token(self) -> int:
        return int(min(self.train.min(initial=0), self.val.min(initial=0)))


def _stdlib_files() -> list[tuple[str, Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for f in sorted(filenames):
            if f.endswith(".py"):
                p = Path(dirpath) / f
                found.append((p.relative_to(root).as_posix(), p))
    return found


def builtin_corpus() -> Corpus:
    """The standard library's source as bytes, split by a stable hash of each file's path."""
    train, val = [], []
    for rel, path in _stdlib_files():
        (val if zlib.crc32(rel.encode()) % 20 == 0 else train).append(path.read_bytes())
    tr, va = b"".join(train), b"".join(val)
    log.info("built-in corpus: %d train bytes, %d validation bytes", len(tr), len(va))
    return Corpus("builtin", np.frombuffer(tr, np.uint8), np.frombuffer(va, np.uint8), BYTE_VOCAB)


def _split(name: str, tokens: np.ndarray, vocab: int | None) -> Corpus:
    n_val = max(1, int(len(tokens) * VAL_FRACTION))
    return Corpus(name, tokens[:-n_val], tokens[-n_val:], vocab)


def load_tokens(path: str | Path) -> np.ndarray:
    """A 1-D token array from ``.npy`` or ``.bin`` (memory-mapped, not read into memory)."""
    p = Path(path)
    if p.stat().st_size == 0:
        raise ValueError(f"{p}: the token file is empty")
    if p.suffix == ".npy":
        try:
            arr = np.load(p, mmap_mode="r")
        except (ValueError, OSError, EOFError):
            raise ValueError(f"{p}: not a readable .npy token array") from None
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{p}: expected a 1-D integer array, got {arr.ndim}-D {arr.dtype}")
        return arr
    dtype = np.uint32 if p.name.endswith(".u32.bin") else np.uint16
    if p.stat().st_size % np.dtype(dtype).itemsize:
        raise ValueError(f"{p}: size is not a multiple of {np.dtype(dtype).itemsize} bytes ({dtype.__name__})")
    return np.memmap(p, dtype=dtype, mode="r")


def load_corpus(spec: str | Path = "builtin") -> Corpus:
    """Resolve a data spec: ``"builtin"``, a text file, or a ``.npy``/``.bin`` token file."""
    if str(spec) == "builtin":
        return builtin_corpus()
    p = Path(spec)
    if not p.is_file():
        raise FileNotFoundError(f"data file not found: {p}")
    if p.suffix in (".npy", ".bin"):
        return _split(p.name, load_tokens(p), None)
    return _split(p.name, np.frombuffer(p.read_bytes(), np.uint8), BYTE_VOCAB)


class Batches:
    """Fixed-length (input, target) batches drawn from a corpus, deterministic in (seed, step)."""

    def __init__(self, corpus: Corpus, batch_size: int, seq_len: int, seed: int = 0) -> None:
        for split in ("train", "val"):
            n = len(getattr(corpus, split))
            if n < seq_len + 1:
                raise ValueError(
                    f"{corpus.name}: the {split} split has {n} tokens, fewer than one sequence of "
                    f"{seq_len} + 1; use more data or a smaller --seq-len"
                )
        self.corpus, self.batch_size, self.seq_len, self.seed = corpus, batch_size, seq_len, seed

    def _rows(self, tokens: np.ndarray, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        idx = starts[:, None] + np.arange(self.seq_len + 1)
        rows = torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64))
        return rows[:, :-1], rows[:, 1:]

    def train(self, step: int, rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Rank ``rank``'s slice of the global batch of ``batch_size * world`` rows at ``step``."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        high = len(self.corpus.train) - self.seq_len
        starts = torch.randint(0, high, (self.batch_size * world,), generator=g).numpy()
        return self._rows(self.corpus.train, starts[rank * self.batch_size:(rank + 1) * self.batch_size])

    def val(self, n_batches: int, rank: int = 0, world: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Rank ``rank``'s slices of ``n_batches`` fixed validation batches of ``batch_size * world``
        rows, evenly spread over the split, seed-independent."""
        high = len(self.corpus.val) - self.seq_len
        rows = self.batch_size * world
        starts = np.linspace(0, high - 1, n_batches * rows).astype(np.int64).reshape(n_batches, rows)
        mine = starts[:, rank * self.batch_size:(rank + 1) * self.batch_size]
        return [self._rows(self.corpus.val, s) for s in mine]
