"""Checkpoints (DESIGN §5): exact round trips, the HF key layout, HF interoperability, clear errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from gpas_probe.checkpoints import load, load_checkpoint, save_checkpoint
from gpas_probe.config import ModelConfig
from gpas_probe.model import build_model
from gpas_probe.model.layers import RMSNorm

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=40, num_heads=4, num_kv_heads=2, num_layers=4,
             max_seq_len=64)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 256}


def _model(seed: int = 0, **kw: Any) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(ModelConfig(**{**SMALL, **kw}))
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():  # move norms, biases and gates off their init so the round trip checks them
        for p in model.parameters():
            if p.ndim <= 1:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


def _ids(vocab: int = 64, seq: int = 20) -> torch.Tensor:
    return torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(9))


ROUND_TRIP = [
    dict(norm="pre"),
    dict(norm="pre", gpas=True),
    dict(norm="pre", gpas=True, gpas_granularity="sublayer", qkv_bias=True),
    dict(norm="post", gpas=True, gpas_mode="naive"),
    dict(norm="sandwich", gpas=True, gpas_granularity="sublayer"),
    dict(norm="deepnorm", gpas=True, gpas_learnable=False, gpas_init=0.7),
    dict(norm="mixln", gpas=True, post_layers=2, tie_embeddings=True),
    dict(norm="lns", gpas=True, tie_embeddings=True),
    dict(norm="lns-gain", gpas=True, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE),
]


@pytest.mark.parametrize("kw", ROUND_TRIP, ids=lambda kw: "-".join(f"{v}" for v in kw.values()))
def test_round_trip_is_exact(tmp_path: Path, kw: dict[str, Any]) -> None:
    model = _model(**kw)
    save_checkpoint(model, tmp_path / "ckpt", step=17)
    result = load(tmp_path / "ckpt")
    loaded = result.model
    assert loaded.config == model.config
    assert result.step == 17 and result.path == tmp_path / "ckpt" and result.backend == "native"
    assert not loaded.training
    ours, theirs = dict(model.named_parameters()), dict(loaded.named_parameters())
    assert ours.keys() == theirs.keys()
    for name, p in ours.items():
        assert torch.equal(p, theirs[name]), name
        assert p.requires_grad == theirs[name].requires_grad, name  # fixed gates stay fixed
    if model.config.tie_embeddings:
        assert loaded.lm_head.weight is loaded.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(model(_ids()).logits, loaded(_ids()).logits)


def test_config_json(tmp_path: Path) -> None:
    model = _model(norm="mixln", gpas=True, post_layers=1, rope_theta=5e5, rope_scaling=LLAMA3_ROPE)
    save_checkpoint(model, tmp_path / "c", step=5)
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    expected = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 32,
        "intermediate_size": 40, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 8, "rms_norm_eps": 1e-6, "rope_theta": 5e5, "rope_scaling": LLAMA3_ROPE,
        "tie_word_embeddings": False, "hidden_act": "silu", "max_position_embeddings": 64,
    }
    for k, v in expected.items():
        assert cfg[k] == v, k
    block = cfg["gpas_probe"]
    assert block["step"] == 5
    mc = block["model_config"]
    assert mc["norm"] == "mixln" and mc["gpas"] is True and mc["post_layers"] == 1
    assert mc["gpas_granularity"] == "layer" and mc["gpas_mode"] == "gpas" and mc["gpas_learnable"] is True
    assert ModelConfig.from_dict(mc) == model.config


def _layer_keys(family: str, gate: str | None) -> set[str]:
    keys = {f"self_attn.{p}_proj.weight" for p in "qkvo"} | {f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
    keys |= {
        "pre": {"input_layernorm.weight", "post_attention_layernorm.weight"},
        "sandwich": {"input_layernorm.weight", "post_attention_layernorm.weight",
                     "pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight"},
        "post": {"post_attention_layernorm.weight", "post_feedforward_layernorm.weight"},
    }[family]
    if gate == "layer":
        keys.add("gpas_block.gate")
    elif gate == "sublayer":
        keys |= {"gpas_attn.gate", "gpas_mlp.gate"}
    return keys


KEY_CASES = [
    ("pre", None, ["pre"] * 4), ("pre", "layer", ["pre"] * 4), ("lns", "sublayer", ["pre"] * 4),
    ("sandwich", "layer", ["sandwich"] * 4), ("post", "layer", ["post"] * 4), ("deepnorm", None, ["post"] * 4),
    ("mixln", "layer", ["post", "pre", "pre", "pre"]),  # default post_layers = L // 4 = 1: post layers first
]


@pytest.mark.parametrize(("scheme", "gate", "families"), KEY_CASES)
def test_keys_follow_hf_layout(tmp_path: Path, scheme: str, gate: str | None, families: list[str]) -> None:
    kw: dict[str, Any] = dict(norm=scheme)
    if gate:
        kw.update(gpas=True, gpas_granularity=gate)
    save_checkpoint(_model(**kw), tmp_path / "c")
    state = load_file(tmp_path / "c" / "model.safetensors")
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for layer, fam in enumerate(families):
        expected |= {f"model.layers.{layer}.{k}" for k in _layer_keys(fam, gate)}
    assert set(state) == expected
    for k, t in state.items():
        assert t.dtype == torch.float32
        if k.endswith(".gate"):
            assert t.shape == ()


def test_norm_keys_hold_the_right_slots(tmp_path: Path) -> None:
    """Each HF norm key holds the norm at the place its name says (values, not just names)."""
    for scheme, slots in (
        ("pre", {"input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm"}),
        ("sandwich", {"input_layernorm": "attn_norm", "post_attention_layernorm": "attn_branch_norm",
                      "pre_feedforward_layernorm": "mlp_norm", "post_feedforward_layernorm": "mlp_branch_norm"}),
        ("post", {"post_attention_layernorm": "attn_out_norm", "post_feedforward_layernorm": "mlp_out_norm"}),
    ):
        model = _model(norm=scheme, gpas=True, gpas_granularity="sublayer")
        save_checkpoint(model, tmp_path / scheme)
        state = load_file(tmp_path / scheme / "model.safetensors")
        for layer, block in enumerate(model.layers):
            for key, slot in slots.items():
                norm = getattr(block, slot)
                assert isinstance(norm, RMSNorm)
                assert torch.equal(state[f"model.layers.{layer}.{key}.weight"], norm.weight), (scheme, key)
            post = scheme == "post"
            attn_gate = block.attn_shortcut_gate if post else block.attn_out_gate
            mlp_gate = block.mlp_shortcut_gate if post else block.mlp_out_gate
            assert torch.equal(state[f"model.layers.{layer}.gpas_attn.gate"], attn_gate.alpha)
            assert torch.equal(state[f"model.layers.{layer}.gpas_mlp.gate"], mlp_gate.alpha)


transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("kw", [dict(), dict(tie_embeddings=True, rope_theta=5e5, rope_scaling=LLAMA3_ROPE)])
def test_hf_from_pretrained_gives_same_logits(tmp_path: Path, kw: dict[str, Any]) -> None:
    model = _model(norm="pre", **kw)
    save_checkpoint(model, tmp_path / "c")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "c", attn_implementation="eager").float().eval()
    assert hf.config.num_key_value_heads == 2
    ids = _ids(seq=48)
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- errors
@pytest.fixture
def saved(tmp_path: Path) -> Path:
    return save_checkpoint(_model(norm="pre", gpas=True), tmp_path / "c", step=1)


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        load_checkpoint(tmp_path / "nowhere")


def test_missing_config(saved: Path) -> None:
    (saved / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_checkpoint(saved)


def test_invalid_config_json(saved: Path) -> None:
    (saved / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="JSON"):
        load_checkpoint(saved)


def test_config_without_our_block_is_read_from_the_keys(saved: Path) -> None:
    """Without the ``gpas_probe`` block the checkpoint is a plain HF one with GPAS gates: same model."""
    model = load_checkpoint(saved)
    cfg = json.loads((saved / "config.json").read_text())
    del cfg["gpas_probe"]
    (saved / "config.json").write_text(json.dumps(cfg))
    foreign = load_checkpoint(saved)
    assert foreign.config.norm.value == "pre" and foreign.config.gpas
    with torch.no_grad():
        assert torch.equal(foreign(_ids()).logits, model(_ids()).logits)


def test_missing_weights(saved: Path) -> None:
    (saved / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_checkpoint(saved)


def test_truncated_weights(saved: Path) -> None:
    f = saved / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ValueError, match="model.safetensors"):
        load_checkpoint(saved)


def test_wrong_shape(saved: Path) -> None:
    cfg = json.loads((saved / "config.json").read_text())
    cfg["gpas_probe"]["model_config"]["intermediate_size"] = 48
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"mlp\.(gate|up|down)_proj\.weight has shape"):
        load_checkpoint(saved)


def test_missing_key(saved: Path) -> None:
    f = saved / "model.safetensors"
    state = load_file(f)
    del state["model.layers.2.gpas_block.gate"]
    save_file(state, f)
    with pytest.raises(ValueError, match="missing weights"):
        load_checkpoint(saved)


def test_leftover_key_is_refused(saved: Path) -> None:
    """A gate the config does not know about (GPAS weights into a model without GPAS) is an error."""
    cfg = json.loads((saved / "config.json").read_text())
    cfg["gpas_probe"]["model_config"]["gpas"] = False
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="gpas_block.gate"):
        load_checkpoint(saved)


def test_rotary_buffers_are_ignored(saved: Path) -> None:
    # older checkpoints carry rotary inv_freq buffers: they load as if absent, and the frequencies are
    # still the model's own (a wrong buffer, here all ones, must not replace them)
    reference = load_checkpoint(saved)
    f = saved / "model.safetensors"
    state = load_file(f)
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    save_file(state, f)
    loaded = load_checkpoint(saved)
    assert torch.equal(loaded.rotary.inv_freq, reference.rotary.inv_freq)
    assert not torch.equal(loaded.rotary.inv_freq, torch.ones_like(loaded.rotary.inv_freq))
    for (name, a), b in zip(reference.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    ids = torch.randint(0, SMALL["vocab_size"], (2, 8), generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded(ids).logits, reference(ids).logits)


def test_save_over_existing_replaces_whole(tmp_path: Path) -> None:
    a, b = _model(seed=1, norm="pre"), _model(seed=2, norm="sandwich", gpas=True)
    path = tmp_path / "c"
    save_checkpoint(a, path, step=1, extra_files={"a_only.pt": {"x": 1}})
    save_checkpoint(b, path, step=2)
    result = load(path)
    assert result.step == 2 and result.model.config == b.config
    assert not (path / "a_only.pt").exists()  # the old directory was replaced, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no temporary or old directories left


def test_failed_save_leaves_old_checkpoint(tmp_path: Path) -> None:
    a = _model(seed=1, norm="pre")
    path = tmp_path / "c"
    save_checkpoint(a, path, step=1)
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    with pytest.raises(Exception):  # noqa: B017 - a local function cannot be pickled
        save_checkpoint(_model(seed=2, norm="pre"), path, step=2, extra_files={"bad.pt": lambda: None})
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    with torch.no_grad():
        assert torch.equal(load_checkpoint(path)(_ids()).logits, a(_ids()).logits)


def test_extra_files_saved(tmp_path: Path) -> None:
    path = save_checkpoint(_model(), tmp_path / "c", extra_files={"state.pt": {"step": 3, "t": torch.arange(4)}})
    got = torch.load(path / "state.pt", weights_only=True)
    assert got["step"] == 3 and torch.equal(got["t"], torch.arange(4))
