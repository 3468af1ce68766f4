"""Evaluation data for profiles: a token stream cut into fixed windows, streamed batch by batch.

Sources (the ``source`` argument, the CLI's ``--data``):

- ``"builtin"``: the validation split of the built-in corpus (:func:`gpas_probe.data.builtin_corpus`),
  byte-level; with a tokenizer, the same text tokenized.
- a text file (any suffix but ``.npy``/``.bin``): tokenized by a Hugging Face ``tokenizer.json``
  when one is given (read with the ``tokenizers`` package, the ``hf`` extra; the text is read and
  tokenized whole, without special tokens such as BOS), else byte-level. The whole file is
  evaluation data.
- a token file: ``.npy`` (1-D integers) or ``.bin`` (raw uint16, or uint32 when named ``*.u32.bin``),
  memory-mapped (:func:`gpas_probe.data.load_tokens`). The whole file is evaluation data.

Byte-level data needs a model vocabulary of at least 256; token ids at or beyond the model's
vocabulary, or a tokenizer with more tokens than the model's embedding has rows, are refused.

Windows: the stream is cut into consecutive windows of ``seq_len + 1`` tokens that overlap by one
token (``input = window[:-1]``, ``labels = window[1:]``), so every token after the first is a target
at most once. When the stream holds at least ``batches * batch_size`` full windows, that many are
taken, evenly spread over the stream (deterministic: no seed). When it holds fewer, every full window
is taken, then the remainder as one right-padded row (input id 0, ``labels = -100`` and ``mask``
false on padding), and fewer batches come out; the last batch may have fewer rows. Every real input
position has a target, so ``mask == (labels != -100)``.

Batches are built one at a time from the (memory-mapped) stream as they are consumed: memory does
not grow with ``batches``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpas_probe.checkpoints.files import TOKENIZER_FILE
from gpas_probe.data import BYTE_VOCAB, builtin_corpus, load_tokens
from gpas_probe.errors import first_line
from gpas_probe.extras import require
from gpas_probe.model import IGNORE_INDEX

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # input_ids, labels, mask (bool, True = real token)
_SCAN = 1 << 24  # tokens per chunk when scanning a token file for its id range


def load_tokenizer(tokenizer: Any) -> tuple[Any, str]:
    """``(tokenizers.Tokenizer, name)`` from a ``tokenizer.json`` path (or a folder holding one), or an
    already built tokenizer object (anything with ``encode`` and ``get_vocab_size``)."""
    if not isinstance(tokenizer, (str, Path)):
        if not (callable(getattr(tokenizer, "encode", None)) and callable(getattr(tokenizer, "get_vocab_size", None))):
            raise ValueError(f"not a tokenizer: {type(tokenizer).__name__}; pass a {TOKENIZER_FILE} path")
        return tokenizer, type(tokenizer).__name__
    p = Path(tokenizer)
    if p.is_dir():
        p = p / TOKENIZER_FILE
    if not p.is_file():
        raise FileNotFoundError(f"tokenizer not found: {p}")
    tokenizers = require("tokenizers", "hf", f"to read {p}")
    try:
        return tokenizers.Tokenizer.from_file(str(p)), str(p)
    except Exception as e:  # the tokenizers package raises plain Exception on bad files
        raise ValueError(f"{p}: not a readable {TOKENIZER_FILE} ({first_line(e)})") from None


@dataclass(frozen=True)
class Row:
    """One window: ``targets`` (1..seq_len) predictions, the first input being token ``start``."""

    start: int
    targets: int


@dataclass
class EvalData:
    """A token stream ready to be cut into evaluation batches (see the module doc).

    ``kind`` is ``"bytes"``, ``"tokenizer"`` or ``"tokens"``; ``tokenizer_vocab`` is the tokenizer's
    vocabulary size (with added tokens) when a tokenizer made the tokens.
    """

    name: str
    tokens: np.ndarray
    kind: str
    source: str
    tokenizer: str | None = None
    tokenizer_vocab: int | None = None
    _max: int | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if len(self.tokens) < 2:
            raise ValueError(f"{self.name}: {len(self.tokens)} tokens, too few to evaluate (need at least 2)")

    # -- checks --------------------------------------------------------------------------------
    @property
    def max_token(self) -> int:
        """The largest token id of the stream (255 for bytes; other streams are scanned once, in chunks)."""
        if self._max is None:
            if self.kind == "bytes":
                self._max = BYTE_VOCAB - 1
            else:
                lo, hi = 0, 0
                for i in range(0, len(self.tokens), _SCAN):
                    chunk = np.asarray(self.tokens[i:i + _SCAN])
                    lo, hi = min(lo, int(chunk.min())), max(hi, int(chunk.max()))
                if lo < 0:
                    raise ValueError(f"{self.name}: negative token id {lo}")
                self._max = hi
        return self._max

    def check_vocab(self, vocab_size: int) -> None:
        """Refuse data that a model with ``vocab_size`` embedding rows cannot read."""
        if self.tokenizer_vocab is not None and self.tokenizer_vocab > vocab_size:
            raise ValueError(f"{self.tokenizer}: the tokenizer has {self.tokenizer_vocab} tokens but the model's "
                             f"vocabulary has {vocab_size}; the tokenizer does not match the model")
        if self.kind == "bytes":
            if vocab_size < BYTE_VOCAB:
                raise ValueError(f"{self.name}: byte-level data needs a vocabulary of at least {BYTE_VOCAB}, the "
                                 f"model has {vocab_size}; give its {TOKENIZER_FILE} or a token file")
            if vocab_size != BYTE_VOCAB:
                log.warning("%s: feeding bytes (ids 0..255) to a model with a vocabulary of %d; unless it was "
                            "trained on bytes, give its %s", self.name, vocab_size, TOKENIZER_FILE)
        if self.max_token >= vocab_size:
            raise ValueError(f"{self.name}: token id {self.max_token} is beyond the model's vocabulary of "
                             f"{vocab_size} (ids 0..{vocab_size - 1})")

    # -- the plan ------------------------------------------------------------------------------
    def rows(self, batch_size: int, seq_len: int, batches: int) -> tuple[int, Callable[[int], Row]]:
        """``(n, row)``: the number of windows that ``batches`` batches take, and window ``i`` (< n)."""
        for name, v in (("batches", batches), ("batch_size", batch_size), ("seq_len", seq_len)):
            if v <= 0:
                raise ValueError(f"{name} must be positive, got {v}")
        wanted = batches * batch_size
        full = (len(self.tokens) - 1) // seq_len
        if full >= wanted:
            return wanted, lambda i: Row((i * full // wanted) * seq_len, seq_len)
        tail = len(self.tokens) - 1 - full * seq_len
        return full + (tail > 0), lambda i: Row(i * seq_len, seq_len if i < full else tail)

    def num_batches(self, batch_size: int, seq_len: int, batches: int) -> int:
        """How many batches :meth:`batches` yields (fewer than asked when the stream is short)."""
        n, _ = self.rows(batch_size, seq_len, batches)
        return math.ceil(n / batch_size)

    def num_targets(self, batch_size: int, seq_len: int, batches: int) -> int:
        """How many target tokens (labels other than -100) :meth:`batches` yields in all."""
        n, row = self.rows(batch_size, seq_len, batches)
        return (n - 1) * seq_len + row(n - 1).targets

    def batches(self, batch_size: int, seq_len: int, batches: int) -> Iterator[Batch]:
        """The batches ``(input_ids, labels, mask)``, each built when it is asked for."""
        n, row = self.rows(batch_size, seq_len, batches)  # checks the arguments now, not at the first next()
        if n < batches * batch_size:
            log.info("%s: %d windows of %d tokens, fewer than %d batches of %d; the last row is padded",
                     self.name, n, seq_len, batches, batch_size)
        return self._generate(n, row, batch_size, seq_len)

    def _generate(self, n: int, row: Callable[[int], Row], batch_size: int, seq_len: int) -> Iterator[Batch]:
        for first in range(0, n, batch_size):
            rows = [row(i) for i in range(first, min(first + batch_size, n))]
            ids = np.zeros((len(rows), seq_len), dtype=np.int64)
            labels = np.full((len(rows), seq_len), IGNORE_INDEX, dtype=np.int64)
            for j, r in enumerate(rows):
                window = np.asarray(self.tokens[r.start:r.start + r.targets + 1], dtype=np.int64)
                ids[j, :r.targets] = window[:-1]
                labels[j, :r.targets] = window[1:]
            labels_t = torch.from_numpy(labels)
            yield torch.from_numpy(ids), labels_t, labels_t != IGNORE_INDEX

    def spec(self) -> dict[str, Any]:
        """What the data is, for run metadata."""
        return {"source": self.source, "name": self.name, "kind": self.kind, "tokenizer": self.tokenizer,
                "stream_tokens": len(self.tokens)}


def _tokenize(text: str, tok: Any, name: str) -> tuple[np.ndarray, int]:
    ids = tok.encode(text, add_special_tokens=False).ids
    vocab = int(tok.get_vocab_size(with_added_tokens=True))
    log.info("%s: %d characters -> %d tokens", name, len(text), len(ids))
    return np.asarray(ids, dtype=np.int64), vocab


def load_eval_data(source: str | Path = "builtin", *, tokenizer: Any = None,
                   vocab_size: int | None = None) -> EvalData:
    """Read (and tokenize) an evaluation source; with ``vocab_size``, check that it fits the model.

    ``tokenizer`` (a ``tokenizer.json`` path or a ``tokenizers.Tokenizer``) applies to ``"builtin"``
    and text files; giving one with a token file is an error."""
    spec = str(source)
    tok, tok_name = load_tokenizer(tokenizer) if tokenizer is not None else (None, None)
    if spec == "builtin":
        val = builtin_corpus().val
        if tok is None:
            data = EvalData("builtin", val, "bytes", spec)
        else:
            ids, vocab = _tokenize(val.tobytes().decode("utf-8", errors="replace"), tok, "builtin")
            data = EvalData("builtin", ids, "tokenizer", spec, tok_name, vocab)
    else:
        p = Path(spec)
        if not p.is_file():
            raise FileNotFoundError(f"data file not found: {p}")
        if p.suffix in (".npy", ".bin"):
            if tok is not None:
                raise ValueError(f"{p}: a token file is already tokenized; a tokenizer applies only to text")
            data = EvalData(p.name, load_tokens(p), "tokens", spec)
        elif tok is not None:
            ids, vocab = _tokenize(p.read_text(encoding="utf-8", errors="replace"), tok, p.name)
            data = EvalData(p.name, ids, "tokenizer", spec, tok_name, vocab)
        else:
            size = p.stat().st_size
            if size < 2:
                raise ValueError(f"{p.name}: {size} tokens, too few to evaluate (need at least 2)")
            data = EvalData(p.name, np.memmap(p, dtype=np.uint8, mode="r"), "bytes", spec)
    if vocab_size is not None:
        data.check_vocab(vocab_size)
    return data


def eval_batches(source: str | Path | EvalData = "builtin", *, tokenizer: Any = None, vocab_size: int,
                 batch_size: int, seq_len: int, batches: int) -> Iterator[Batch]:
    """Stream up to ``batches`` batches ``(input_ids, labels, mask)`` of shape ``(rows, seq_len)``.

    ``source`` is a spec (module doc) or a loaded :class:`EvalData` (then ``tokenizer`` is unused).
    The data is read and checked against ``vocab_size`` by this call, so bad input fails here; the
    returned generator builds each batch when it is asked for."""
    data = source if isinstance(source, EvalData) else load_eval_data(source, tokenizer=tokenizer)
    data.check_vocab(vocab_size)
    return data.batches(batch_size, seq_len, batches)
