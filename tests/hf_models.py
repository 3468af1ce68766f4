"""Tiny random Hugging Face models and the references the Hugging Face tests share (nothing is downloaded:
every model is built from a config here). Import after ``pytest.importorskip("transformers")``."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import transformers

V, H = 64, 32
SEQ, BS, NB = 16, 2, 2
KEY = ["layer", "site", "direction", "stat"]
TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)


def tiny_llama(layers: int = 3, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=H, intermediate_size=64, num_hidden_layers=layers,
                                      num_attention_heads=2, num_key_value_heads=1, vocab_size=V,
                                      max_position_embeddings=64)  # no pad_token_id: no padding_idx
    return transformers.LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=2, n_embd=H, n_head=2, vocab_size=V, n_positions=64, **TOKENS)
    return transformers.GPT2LMHeadModel(config).eval()


def ids(b: int = 2, t: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
              "_forward_hooks_always_called")


def all_hooks(model: torch.nn.Module) -> int:
    return sum(len(getattr(m, d)) for m in model.modules() for d in HOOK_DICTS)


def stats(xs: list[torch.Tensor], masks: list[torch.Tensor]) -> dict[str, float]:
    """var/rms/absmax of (B, T, hidden) tensors over the positions the masks keep, pooled."""
    n = sum(int(m.sum()) for m in masks)
    hidden = xs[0].shape[-1]
    var = sum(float(x.double().var(-1, correction=0)[m].sum()) for x, m in zip(xs, masks, strict=True))
    sq = sum(float(x.double().pow(2).sum(-1)[m].sum()) for x, m in zip(xs, masks, strict=True))
    absmax = max(float(x.double().abs().amax(-1)[m].max()) for x, m in zip(xs, masks, strict=True))
    return {"var": var / n, "rms": math.sqrt(sq / (n * hidden)), "absmax": absmax}


def value(df: pd.DataFrame, layer: int, site: str, direction: str, stat: str) -> float:
    hit = df[(df.layer == layer) & (df.site == site) & (df.direction == direction) & (df.stat == stat)]
    assert len(hit) == 1, (layer, site, direction, stat, len(hit))
    return float(hit.value.iloc[0])


def check_stats(df: pd.DataFrame, layer: int, site: str, direction: str, ref: dict[str, float],
                 rel: float = 1e-5) -> None:
    for stat, want in ref.items():
        assert value(df, layer, site, direction, stat) == pytest.approx(want, rel=rel, abs=1e-12), (site, stat)


def token_file(tmp_path: Path, n: int, seed: int = 3) -> Path:
    path = tmp_path / "tokens.npy"
    np.save(path, np.random.default_rng(seed).integers(0, V, n))
    return path
