"""The ``pre`` scheme is LLaMA: weights copied from a Hugging Face model give the same logits."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from gpas_probe.checkpoints import assign_weights  # noqa: E402
from gpas_probe.config import ModelConfig  # noqa: E402
from gpas_probe.model import build_model  # noqa: E402

BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=64, rms_norm_eps=1e-6)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 256}


def _hf_model(cls_name: str, **kw: Any) -> torch.nn.Module:
    cfg_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[cls_name]
    model_cls = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM}[cls_name]
    cfg = cfg_cls(**{**BASE, **kw})
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = model_cls(cfg).float().eval()
    # HF initialises norms to 1 and biases to 0; randomize them so they are checked too.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_((1.0 if name.endswith("norm.weight") else 0.0) + 0.2 * torch.randn(p.shape, generator=g))
    return model


def _ours(hf: torch.nn.Module, rope_theta: float = 10000.0, rope_scaling: dict | None = None,
          qkv_bias: bool = False) -> torch.nn.Module:
    c = hf.config
    cfg = ModelConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                      num_layers=c.num_hidden_layers, num_heads=c.num_attention_heads,
                      num_kv_heads=c.num_key_value_heads, max_seq_len=c.max_position_embeddings,
                      rms_eps=c.rms_norm_eps, rope_theta=rope_theta, rope_scaling=rope_scaling, qkv_bias=qkv_bias,
                      tie_embeddings=bool(c.tie_word_embeddings), norm="pre")
    model = build_model(cfg)
    assign_weights(model, hf.state_dict(), "test")
    return model.eval()


def _compare(hf: torch.nn.Module, ours: torch.nn.Module, seq: int = 40) -> None:
    ids = torch.randint(0, hf.config.vocab_size, (2, seq), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        got = ours(ids).logits
    assert ref.shape == got.shape
    assert ref.abs().max() > 0.05  # the logits carry signal at this tolerance
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_llama_mha() -> None:
    hf = _hf_model("llama")
    _compare(hf, _ours(hf))


def test_llama_gqa() -> None:
    hf = _hf_model("llama", num_key_value_heads=2)
    _compare(hf, _ours(hf))


def test_llama_multi_query_and_explicit_head_dim() -> None:
    hf = _hf_model("llama", num_key_value_heads=1, head_dim=32)
    c = hf.config
    cfg = ModelConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                      num_layers=c.num_hidden_layers, num_heads=4, num_kv_heads=1, head_dim=32)
    ours = build_model(cfg)
    assign_weights(ours, hf.state_dict(), "test")
    _compare(hf, ours.eval())


def test_llama_tied_embeddings() -> None:
    hf = _hf_model("llama", tie_word_embeddings=True, num_key_value_heads=2)
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    ours = _ours(hf)
    assert ours.lm_head.weight is ours.embed_tokens.weight
    _compare(hf, ours)


def test_qwen2_qkv_bias() -> None:
    hf = _hf_model("qwen2", num_key_value_heads=2)
    assert hf.model.layers[0].self_attn.q_proj.bias is not None
    assert hf.model.layers[0].self_attn.o_proj.bias is None
    _compare(hf, _ours(hf, rope_theta=float(hf.config.rope_parameters["rope_theta"]), qkv_bias=True))


def test_llama_attention_bias_is_not_dropped() -> None:
    """HF LLaMA's attention_bias also biases o_proj, which this model lacks: loading must refuse,
    not silently drop the bias."""
    hf = _hf_model("llama", attention_bias=True)
    assert hf.model.layers[0].self_attn.o_proj.bias is not None
    with pytest.raises(ValueError, match="o_proj.bias"):
        _ours(hf, qkv_bias=True)


@pytest.mark.parametrize("scaling", [None, LLAMA3_ROPE])
def test_llama_rope_theta_and_llama3_scaling(scaling: dict | None) -> None:
    params = {"rope_type": "default", "rope_theta": 500000.0} if scaling is None else {**scaling,
                                                                                       "rope_theta": 500000.0}
    hf = _hf_model("llama", num_key_value_heads=2, rope_parameters=params)
    assert hf.config.rope_parameters["rope_type"] == ("default" if scaling is None else "llama3")
    _compare(hf, _ours(hf, rope_theta=500000.0, rope_scaling=scaling), seq=48)


def test_llama3_case_covers_every_band() -> None:
    """With head_dim 16 and theta 5e5, the wavelengths 2 pi / theta^(-2i/d) fall in all three bands of
    Llama-3 scaling (kept: < orig/high, smoothed: in between, divided by factor: > orig/low)."""
    d, orig = 16, LLAMA3_ROPE["original_max_position_embeddings"]
    wavelengths = [2 * math.pi * 500000.0 ** (2 * i / d) for i in range(d // 2)]
    high, low = orig / LLAMA3_ROPE["high_freq_factor"], orig / LLAMA3_ROPE["low_freq_factor"]
    assert any(w < high for w in wavelengths) and any(w > low for w in wavelengths)
    assert any(high <= w <= low for w in wavelengths)


def test_llama3_scaling_changes_frequencies() -> None:
    """The scaled case above is a real test: scaling changes the logits at these lengths."""
    hf = _hf_model("llama", rope_parameters={**LLAMA3_ROPE, "rope_theta": 500000.0})
    plain = _ours(hf, rope_theta=500000.0)
    scaled = _ours(hf, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE)
    ids = torch.randint(0, 128, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (plain(ids).logits - scaled(ids).logits).abs().max() > 1e-3
