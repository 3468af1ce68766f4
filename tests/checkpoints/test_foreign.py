"""Loading checkpoints we did not write (DESIGN §5).

Hugging Face LLaMA, Qwen2 and Mistral checkpoints are built with transformers at random init and
saved into tmp_path; our logits must equal transformers' own. Paper-code checkpoints are written key
by key in that code's layout; the loaded model must reproduce the source model and an independent
forward written from the DESIGN §4 equations over the raw keys.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from gpas_probe.checkpoints import (
    checkpoint_step,
    config_from_hf,
    infer_scheme,
    load_foreign,
    parameter_map,
    read_weights,
)
from gpas_probe.config import GateGranularity, ModelConfig, NormScheme
from gpas_probe.model import build_model

transformers = pytest.importorskip("transformers")

VOCAB, HIDDEN, FFN, HEADS, KV_HEADS = 128, 64, 96, 4, 2


def _ids(seq: int = 24, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights large enough that attention is far from uniform, so RoPE and wiring errors show."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        if "norm" in name:
            p.copy_(1 + 0.3 * noise)
        elif name.endswith(".gate") or name.endswith(".alpha"):
            p.copy_(torch.empty(p.shape).uniform_(-1.2, 1.2, generator=g))
        elif "embed" in name:
            p.copy_(noise)
        else:
            p.copy_(0.15 * noise)


# ------------------------------------------------------------------------------ Hugging Face models

def _hf_model(kind: str, **overrides):
    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=3,
                  num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=256)
    common.update(overrides)
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
           "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}[kind]
    torch.manual_seed(0)
    model = cls[1](cls[0](**common)).eval()
    _randomize(model)
    return model


def _hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _our_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


LLAMA3 = dict(tie_word_embeddings=True, rope_theta=500000.0)


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory):
    """LLaMA with grouped-query attention, tied embeddings and rope_theta 500000, saved once."""
    model = _hf_model("llama", rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                      tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path)
    return model, path


def test_llama_gqa_tied_theta(llama) -> None:
    hf, path = llama
    assert json.loads((path / "config.json").read_text())["rope_parameters"]["rope_theta"] == 500000.0
    ours = load_foreign(path)
    cfg = ours.config
    assert (cfg.num_kv_heads, cfg.rope_theta, cfg.tie_embeddings, cfg.norm, cfg.gpas) == (
        KV_HEADS, 500000.0, True, NormScheme.PRE, False)
    assert ours.lm_head.weight is ours.embed_tokens.weight
    assert not ours.training and checkpoint_step(path) is None
    ids = _ids()
    torch.testing.assert_close(_our_logits(ours, ids), _hf_logits(hf, ids), rtol=1e-4, atol=1e-4)


def test_wrong_rope_theta_is_detected(llama) -> None:
    """The comparison above can fail: the same weights under the default theta give other logits."""
    hf, path = llama
    ours = load_foreign(path)
    ours.rotary.inv_freq = 1.0 / (10000.0 ** (torch.arange(0, ours.config.head_dim, 2).float() / ours.config.head_dim))
    ids = _ids()
    assert (_our_logits(ours, ids) - _hf_logits(hf, ids)).abs().max() > 1e-2


def test_llama_sharded_safetensors(llama, tmp_path: Path) -> None:
    hf, _ = llama
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and not (tmp_path / "model.safetensors").exists()
    ids = _ids()
    torch.testing.assert_close(_our_logits(load_foreign(tmp_path), ids), _hf_logits(hf, ids), rtol=1e-4, atol=1e-4)


def _save_bin(hf, path: Path, shards: int = 1) -> None:
    """pytorch_model.bin (transformers 5 no longer writes it), with a legacy rotary buffer."""
    hf.config.save_pretrained(path)
    tied = hf.config.tie_word_embeddings
    state = {k: v.clone() for k, v in hf.state_dict().items() if k != "lm_head.weight" or not tied}
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    if shards == 1:
        torch.save(state, path / "pytorch_model.bin")
        return
    keys = sorted(state)
    weight_map = {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: state[k] for k in keys[i::shards]}
        torch.save(part, path / name)
        weight_map.update(dict.fromkeys(part, name))
    (path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("shards", [1, 3])
def test_llama_pytorch_bin(llama, tmp_path: Path, shards: int) -> None:
    hf, _ = llama
    _save_bin(hf, tmp_path, shards)
    ids = _ids()
    torch.testing.assert_close(_our_logits(load_foreign(tmp_path), ids), _hf_logits(hf, ids), rtol=1e-4, atol=1e-4)


def test_llama_bf16(llama, tmp_path: Path) -> None:
    hf, _ = llama
    hf.to(torch.bfloat16).save_pretrained(tmp_path)
    hf.float()
    ref = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = _ids()
    want = _hf_logits(ref, ids)
    as_fp32 = load_foreign(tmp_path, dtype=torch.float32)
    torch.testing.assert_close(_our_logits(as_fp32, ids), want, rtol=1e-4, atol=1e-4)
    stored = load_foreign(tmp_path)  # keeps bf16; rotary frequencies stay fp32
    assert stored.embed_tokens.weight.dtype == torch.bfloat16 and stored.rotary.inv_freq.dtype == torch.float32
    got = _our_logits(stored, ids).float()
    assert (got - want).abs().max() < 0.1 * want.abs().max()


def test_llama3_rope_scaling(tmp_path: Path) -> None:
    scaling = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    hf = _hf_model("llama", rope_parameters=scaling)
    hf.save_pretrained(tmp_path)
    ours = load_foreign(tmp_path)
    assert ours.config.rope_scaling is not None and ours.config.rope_scaling["factor"] == 8.0
    ids = _ids(seq=48)
    want = _hf_logits(hf, ids)
    torch.testing.assert_close(_our_logits(ours, ids), want, rtol=1e-4, atol=1e-4)
    # the scaling matters at this length: the same weights without it give other logits
    plain = ModelConfig(**{**ours.config.to_dict(), "rope_scaling": None})
    unscaled = build_model(plain).eval()
    unscaled.load_state_dict(ours.state_dict())
    assert (_our_logits(unscaled, ids) - want).abs().max() > 1e-2


def test_old_style_rope_fields_are_read() -> None:
    """transformers 4 wrote rope_theta and rope_scaling at the top level."""
    keys = [f"model.layers.0.{n}.weight" for n in ("input_layernorm", "post_attention_layernorm")]
    old = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 8, "hidden_size": 16,
           "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2, "rope_theta": 500000.0,
           "rope_scaling": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 2.0,
                            "original_max_position_embeddings": 64}}
    cfg = config_from_hf(old, keys)
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling == {k: v for k, v in old["rope_scaling"].items()}
    assert cfg.num_kv_heads == 2 and cfg.tie_embeddings  # defaults: MHA; no lm_head among the keys -> tied
    with pytest.raises(ValueError, match="rope_type='linear'"):
        config_from_hf({**old, "rope_scaling": {"type": "linear", "factor": 2.0}}, keys)


@pytest.mark.parametrize("kind", ["qwen2", "mistral"])
def test_qwen2_and_mistral(kind: str, tmp_path: Path) -> None:
    hf = _hf_model(kind, num_hidden_layers=2)
    hf.save_pretrained(tmp_path)
    ours = load_foreign(tmp_path)
    assert ours.config.qkv_bias is (kind == "qwen2")
    if kind == "qwen2":
        assert ours.layers[0].attn.q_proj.bias.abs().sum() > 0  # randomised, loaded
    ids = _ids(seq=20)
    torch.testing.assert_close(_our_logits(ours, ids), _hf_logits(hf, ids), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- paper-code layout

PAPER_LAYERS = 4


def _paper_config(layers: int = PAPER_LAYERS) -> dict:
    """A plain LlamaConfig, as the paper's scripts save it (no gpas_probe block, no rope_theta)."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "hidden_size": HIDDEN, "intermediate_size": FFN, "num_attention_heads": HEADS,
            "num_hidden_layers": layers, "vocab_size": VOCAB, "rms_norm_eps": 1e-6, "max_sequence_length": 256,
            "tie_word_embeddings": False, "torch_dtype": "float32"}


def _paper_checkpoint(path: Path, norm: str, gpas: bool, post_layers: int | None = None, seed: int = 1,
                      gate_shape: tuple[int, ...] = ()):
    """A model of the scheme with random norms and gates, saved in the paper code's key layout."""
    src = build_model(ModelConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_heads=HEADS,
                                  num_layers=PAPER_LAYERS, norm=norm, post_layers=post_layers, gpas=gpas)).eval()
    _randomize(src, seed)
    state = {k: p.detach().clone() for k, p in parameter_map(src).items()}
    for k in state:
        if k.endswith("gpas_block.gate"):
            state[k] = state[k].reshape(gate_shape)
    state["model.layers.1.self_attn.rotary_emb.inv_freq"] = torch.ones(HIDDEN // HEADS // 2)
    path.mkdir(parents=True, exist_ok=True)
    save_file(state, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(_paper_config()))
    return src, state


def _rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def _rope(x: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """x: (B, heads, T, d); rotates pairs (i, i + d/2) by position * theta^(-2i/d)."""
    T, d = x.shape[-2], x.shape[-1]
    ang = torch.arange(T, dtype=torch.float64)[:, None] * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    cos, sin = ang.cos(), ang.sin()
    a, b = x[..., : d // 2], x[..., d // 2:]
    return torch.cat((a * cos - b * sin, b * cos + a * sin), -1)


def _attn(x: torch.Tensor, s: dict, p: str) -> torch.Tensor:
    B, T, _ = x.shape
    d = HIDDEN // HEADS
    q, k, v = (F.linear(x, s[f"{p}.self_attn.{n}_proj.weight"]).view(B, T, -1, d).transpose(1, 2) for n in "qkv")
    q, k = _rope(q), _rope(k)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    y = scores.softmax(-1) @ v
    return F.linear(y.transpose(1, 2).reshape(B, T, -1), s[f"{p}.self_attn.o_proj.weight"])


def _mlp(x: torch.Tensor, s: dict, p: str) -> torch.Tensor:
    g, u = (F.linear(x, s[f"{p}.mlp.{n}_proj.weight"]) for n in ("gate", "up"))
    return F.linear(F.silu(g) * u, s[f"{p}.mlp.down_proj.weight"])


def _equations(s: dict, ids: torch.Tensor, deepnorm: bool = False) -> torch.Tensor:
    """DESIGN §4, layer by layer, from the raw paper-layout keys, in float64."""
    s = {k: v.double() for k, v in s.items()}
    x = s["model.embed_tokens.weight"][ids]
    a = (2 * PAPER_LAYERS) ** 0.25 if deepnorm else 1.0
    for layer in range(PAPER_LAYERS):
        p = f"model.layers.{layer}"
        alpha = s.get(f"{p}.gpas_block.gate")
        scale = 1.0 if alpha is None else 1 - F.silu(alpha.reshape(()))
        G = lambda t, scale=scale: scale * t
        N = lambda name, t, p=p: _rms(t, s[f"{p}.{name}.weight"])
        if f"{p}.input_layernorm.weight" not in s:  # post family: h = N1(a G(x) + A x)
            h = N("post_attention_layernorm", a * G(x) + _attn(x, s, p))
            x = N("post_feedforward_layernorm", a * G(h) + _mlp(h, s, p))
        elif f"{p}.pre_feedforward_layernorm.weight" in s:  # sandwich
            h = G(x + N("post_attention_layernorm", _attn(N("input_layernorm", x), s, p)))
            x = G(h + N("post_feedforward_layernorm", _mlp(N("pre_feedforward_layernorm", h), s, p)))
        else:  # pre
            h = G(x + _attn(N("input_layernorm", x), s, p))
            x = G(h + _mlp(N("post_attention_layernorm", h), s, p))
    return F.linear(_rms(x, s["model.norm.weight"]), s["lm_head.weight"])


PAPER_CASES = [  # (source scheme, GPAS, post_layers written, what inference gives)
    ("pre", False, None, (NormScheme.PRE, None, False)),
    ("pre", True, None, (NormScheme.PRE, None, True)),
    ("sandwich", True, None, (NormScheme.SANDWICH, None, True)),
    ("mixln", True, 2, (NormScheme.MIXLN, 2, True)),  # 2, not the default L // 4 = 1
]


@pytest.mark.parametrize(("norm", "gpas", "post_layers", "inferred"), PAPER_CASES)
def test_paper_layout_inferred(tmp_path: Path, norm, gpas, post_layers, inferred) -> None:
    src, state = _paper_checkpoint(tmp_path, norm, gpas, post_layers, gate_shape=(1,) if norm == "sandwich" else ())
    keys = read_weights(tmp_path).keys()
    assert not any("inv_freq" in k for k in keys)
    assert infer_scheme(keys, PAPER_LAYERS) == inferred
    ours = load_foreign(tmp_path)
    assert (ours.config.norm, ours.config.post_layers, ours.config.gpas) == inferred
    ids = _ids()
    got = _our_logits(ours, ids)
    torch.testing.assert_close(got, _our_logits(src, ids), rtol=0, atol=1e-5)
    torch.testing.assert_close(got.double(), _equations(state, ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("norm", ["post", "deepnorm"])
def test_paper_layout_post_deepnorm_need_override(tmp_path: Path, norm: str) -> None:
    src, state = _paper_checkpoint(tmp_path, norm, gpas=True)
    with pytest.raises(ValueError, match=r"norm='post' or norm='deepnorm'") as err:
        load_foreign(tmp_path)
    assert "--norm post|deepnorm" in str(err.value) and "\n" not in str(err.value)
    ours = load_foreign(tmp_path, norm=norm)
    assert ours.config.norm is NormScheme(norm) and ours.config.gpas
    ids = _ids()
    got = _our_logits(ours, ids)
    torch.testing.assert_close(got, _our_logits(src, ids), rtol=0, atol=1e-5)
    torch.testing.assert_close(got.double(), _equations(state, ids, deepnorm=norm == "deepnorm"), rtol=1e-4, atol=1e-4)
    # the two readings really differ, so the choice is the user's to make
    other = load_foreign(tmp_path, norm="deepnorm" if norm == "post" else "post")
    assert (_our_logits(other, ids) - got).abs().max() > 1e-2


def test_overrides_must_agree_with_keys(tmp_path: Path) -> None:
    _paper_checkpoint(tmp_path / "mix", "mixln", gpas=True, post_layers=2)
    _paper_checkpoint(tmp_path / "pre", "pre", gpas=False)
    keys = read_weights(tmp_path / "mix").keys()
    assert infer_scheme(keys, PAPER_LAYERS, norm="mixln") == (NormScheme.MIXLN, 2, True)
    assert infer_scheme(keys, PAPER_LAYERS, post_layers=2) == (NormScheme.MIXLN, 2, True)
    with pytest.raises(ValueError, match="post_layers=1 does not match the checkpoint: layer 1"):
        infer_scheme(keys, PAPER_LAYERS, post_layers=1)
    with pytest.raises(ValueError, match="norm='pre' does not match"):
        load_foreign(tmp_path / "mix", norm="pre")
    with pytest.raises(ValueError, match="unknown norm 'layernorm'"):
        load_foreign(tmp_path / "mix", norm="layernorm")
    with pytest.raises(ValueError, match="post_layers applies only to norm='mixln'"):
        infer_scheme(keys, PAPER_LAYERS, norm="post", post_layers=2)
    # LNS checkpoints look like pre: the user names them
    lns = load_foreign(tmp_path / "pre", norm="lns-gain")
    assert lns.config.norm is NormScheme.LNS_GAIN and not lns.config.gpas
    with pytest.raises(ValueError, match="norm='sandwich' does not match"):
        load_foreign(tmp_path / "pre", norm="sandwich")


def test_sublayer_gates_and_step(tmp_path: Path) -> None:
    """Per-sub-layer gates (gpas_attn/gpas_mlp) and the paper code's training_state.json step."""
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_heads=HEADS, num_layers=2,
                      gpas=True, gpas_granularity="sublayer", tie_embeddings=True)
    src = build_model(cfg).eval()
    _randomize(src)
    save_file({k: p.detach().clone() for k, p in parameter_map(src).items()}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({**_paper_config(2), "tie_word_embeddings": True}))
    (tmp_path / "training_state.json").write_text(json.dumps({"global_step": 4000, "update_step": 1000}))
    ours = load_foreign(tmp_path)
    assert ours.config.gpas_granularity is GateGranularity.SUBLAYER and checkpoint_step(tmp_path) == 1000
    ids = _ids()
    torch.testing.assert_close(_our_logits(ours, ids), _our_logits(src, ids), rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------ bad input

def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert msg and "\n" not in msg
    return msg


def test_missing_config_and_weights(tmp_path: Path) -> None:
    _paper_checkpoint(tmp_path, "pre", gpas=False)
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json") as err:
        load_foreign(tmp_path)
    _one_line(err)
    (tmp_path / "config.json").write_text(json.dumps(_paper_config()))
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights found") as err:
        load_foreign(tmp_path)
    _one_line(err)


def test_truncated_weights(llama, tmp_path: Path) -> None:
    hf, _ = llama
    hf.save_pretrained(tmp_path / "safe")
    f = tmp_path / "safe" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ValueError, match="model.safetensors: unreadable weights") as err:
        load_foreign(tmp_path / "safe")
    _one_line(err)
    _save_bin(hf, tmp_path / "bin")
    f = tmp_path / "bin" / "pytorch_model.bin"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ValueError, match="pytorch_model.bin: unreadable weights") as err:
        load_foreign(tmp_path / "bin")
    _one_line(err)


def test_missing_shard_and_missing_tensor(llama, tmp_path: Path) -> None:
    hf, _ = llama
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (tmp_path / shard).unlink()
    with pytest.raises(FileNotFoundError, match=f"missing weights file {shard}") as err:
        load_foreign(tmp_path)
    _one_line(err)

    _, state = _paper_checkpoint(tmp_path / "paper", "pre", gpas=True)
    del state["model.layers.2.mlp.up_proj.weight"]
    save_file(state, tmp_path / "paper" / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing weights, e.g. \['model.layers.2.mlp.up_proj.weight'\]") as err:
        load_foreign(tmp_path / "paper")
    _one_line(err)


def test_shapes_contradicting_config(tmp_path: Path) -> None:
    _paper_checkpoint(tmp_path, "pre", gpas=False)
    (tmp_path / "config.json").write_text(json.dumps({**_paper_config(), "intermediate_size": FFN * 2}))
    with pytest.raises(ValueError, match=r"gate_proj.weight has shape \(96, 64\), the config implies \(192, 64\)") as e:
        load_foreign(tmp_path)
    _one_line(e)
    (tmp_path / "config.json").write_text(json.dumps({**_paper_config(), "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match="layer 3 found, but the config has num_hidden_layers=3") as e:
        load_foreign(tmp_path)
    _one_line(e)
    (tmp_path / "config.json").write_text(json.dumps({**_paper_config(), "tie_word_embeddings": True}))
    tied = load_foreign(tmp_path)  # a tied config ignores a stored lm_head
    assert tied.config.tie_embeddings and tied.lm_head.weight is tied.embed_tokens.weight


@pytest.mark.parametrize(("change", "match"), [
    ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, r"'GPT2LMHeadModel' is not supported natively.*"
                                                                   r"pip install \"gpas-probe\[hf\]\""),
    ({"architectures": ["LlamaForSequenceClassification"]}, "not supported natively"),
    ({"attention_bias": True}, "attention_bias=true is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_size": None}, "config.json lacks 'hidden_size'"),
])
def test_unsupported_configs(tmp_path: Path, change: dict, match: str) -> None:
    _paper_checkpoint(tmp_path, "pre", gpas=False)
    (tmp_path / "config.json").write_text(json.dumps({**_paper_config(), **change}))
    with pytest.raises(ValueError, match=match) as err:
        load_foreign(tmp_path)
    assert str(tmp_path) in _one_line(err)


def test_unexpected_weights(tmp_path: Path) -> None:
    _, state = _paper_checkpoint(tmp_path, "pre", gpas=False)
    state["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(HIDDEN)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"does not account for, e.g. \['model.layers.0.self_attn.o_proj.bias'\]"):
        load_foreign(tmp_path)


def test_mistral_sliding_window_warns(caplog: pytest.LogCaptureFixture) -> None:
    keys = [f"model.layers.0.{n}.weight" for n in ("input_layernorm", "post_attention_layernorm")]
    cfg = {"model_type": "mistral", "vocab_size": 8, "hidden_size": 16, "intermediate_size": 8, "num_hidden_layers": 1,
           "num_attention_heads": 2, "sliding_window": 64, "max_position_embeddings": 1024}
    with caplog.at_level("WARNING", logger="gpas_probe.foreign"):
        config_from_hf(cfg, keys)
    assert "sliding_window=64 is ignored" in caplog.text
