"""Evaluation data for profiles: windows spread, padded and counted; lazy batches; bad data refused."""

from __future__ import annotations

import inspect
import itertools
import sys

import numpy as np
import pytest
import torch
from profile_runs import word_tokenizer, words_text

from gpas_probe.evaldata import eval_batches, load_eval_data


def _windows(tokens: np.ndarray, seq: int, rows: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Hand-made reference: window i = tokens[i*seq : i*seq + seq + 1], cut short at the end."""
    out = []
    for i in rows:
        w = tokens[i * seq:i * seq + seq + 1]
        out.append((w[:-1], w[1:]))
    return out


def _same(got: list, exp: list) -> bool:
    return len(got) == len(exp) and all(np.array_equal(a, c) and np.array_equal(b, d)
                                        for (a, b), (c, d) in zip(got, exp, strict=True))


def _unbatch(batches) -> list[tuple[np.ndarray, np.ndarray]]:
    rows = []
    for ids, labels, mask in batches:
        assert ids.dtype == labels.dtype == torch.int64 and mask.dtype == torch.bool
        assert torch.equal(mask, labels != -100)
        assert (ids[~mask] == 0).all()
        for i in range(len(ids)):
            m = mask[i]
            assert m[: int(m.sum())].all()  # real tokens first, padding on the right
            rows.append((ids[i][m].numpy(), labels[i][m].numpy()))
    return rows


def test_windows_spread_pad_and_count(tmp_path) -> None:
    tokens = (np.arange(1000) * 7 % 997).astype(np.int32)
    np.save(tmp_path / "t.npy", tokens)
    data = load_eval_data(tmp_path / "t.npy", vocab_size=997)
    # plenty of data: 6 of the 62 full windows, evenly spread (i * 62 // 6)
    got = _unbatch(data.batches(3, 16, 2))
    exp = _windows(tokens, 16, [i * 62 // 6 for i in range(6)])
    assert len(got) == 6 and _same(got, exp)
    # too little: every full window, then the 7-target tail padded, in ceil(63 / 4) batches
    batches = list(data.batches(4, 16, 100))
    got = _unbatch(batches)
    exp = _windows(tokens, 16, list(range(63)))
    assert len(got) == 63 and len(exp[-1][1]) == 999 - 62 * 16 == 7
    assert _same(got, exp)
    assert len(batches) == data.num_batches(4, 16, 100) == 16 and batches[-1][0].shape == (3, 16)
    assert data.num_targets(4, 16, 100) == 999 == sum(int(b[2].sum()) for b in batches)
    assert data.num_targets(3, 16, 2) == 6 * 16


def test_eval_batches_is_lazy() -> None:
    gen = eval_batches("builtin", vocab_size=256, batch_size=2, seq_len=8, batches=10**9)
    assert inspect.isgenerator(gen)
    first = list(itertools.islice(gen, 3))  # a billion batches asked for, three built
    assert [b[0].shape for b in first] == [(2, 8)] * 3


def test_bad_data_is_refused(tmp_path, monkeypatch) -> None:
    np.save(tmp_path / "big.npy", np.array([1, 5, 300, 2]))
    with pytest.raises(ValueError, match="token id 300 is beyond the model's vocabulary of 256"):
        eval_batches(tmp_path / "big.npy", vocab_size=256, batch_size=1, seq_len=2, batches=1)
    (tmp_path / "t.txt").write_text(words_text(3))
    with pytest.raises(ValueError, match="byte-level data needs a vocabulary of at least 256"):
        load_eval_data(tmp_path / "t.txt", vocab_size=100)
    tok = word_tokenizer(words_text(3))
    tok.save(str(tmp_path / "tokenizer.json"))
    n = tok.get_vocab_size()
    with pytest.raises(ValueError, match="does not match the model"):
        load_eval_data(tmp_path / "t.txt", tokenizer=tmp_path / "tokenizer.json", vocab_size=n - 1)
    assert load_eval_data(tmp_path / "t.txt", tokenizer=tmp_path, vocab_size=n).kind == "tokenizer"
    with pytest.raises(ValueError, match="applies only to text"):
        load_eval_data(tmp_path / "big.npy", tokenizer=tok)
    with pytest.raises(FileNotFoundError, match="data file not found"):
        load_eval_data(tmp_path / "nope.txt")
    (tmp_path / "one.txt").write_text("x")
    with pytest.raises(ValueError, match="too few"):
        load_eval_data(tmp_path / "one.txt")
    with pytest.raises(ValueError, match="seq_len must be positive"):
        eval_batches(tmp_path / "t.txt", vocab_size=256, batch_size=1, seq_len=0, batches=1)
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # as if the hf extra were not installed
    with pytest.raises(ImportError, match=r'pip install "gpas-probe\[hf\]"'):
        load_eval_data(tmp_path / "t.txt", tokenizer=tmp_path / "tokenizer.json")
