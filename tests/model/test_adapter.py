"""Probing Hugging Face causal LMs without changing them (``gpas_probe.model.adapter``, re-exported by
``gpas_probe.hf``): every site against brute-force references built from the models' own tensors."""

from __future__ import annotations

import copy
import importlib
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.utils.checkpoint import checkpoint

transformers = pytest.importorskip("transformers")

from hf_models import (  # noqa: E402
    KEY,
    TOKENS,
    H,
    V,
    all_hooks,
    check_stats,
    ids,
    stats,
    tiny_gpt2,
    tiny_llama,
    value,
)

import gpas_probe  # noqa: E402
from gpas_probe import hf  # noqa: E402
from gpas_probe.model import SITES  # noqa: E402
from gpas_probe.probes import ACTIVATION_SITES, ProbeConfig  # noqa: E402


def test_instrument_changes_nothing_and_uninstrument_restores(tmp_path: Path) -> None:
    for model in (tiny_llama(), tiny_gpt2()):
        x = ids()
        ref = model(x).logits
        keys, params = list(model.state_dict()), list(model.parameters())
        hooks = all_hooks(model)
        layers = hf.instrument(model)
        assert hf.is_instrumented(model) and [b.layer for b in layers] == list(range(len(layers)))
        assert hf.instrument(model) == layers  # idempotent
        assert gpas_probe.probes.find_blocks(model) == layers
        assert torch.equal(model(x).logits, ref)
        assert list(model.state_dict()) == keys and list(model.parameters()) == params
        model.save_pretrained(tmp_path / "saved")
        assert set(load_file(tmp_path / "saved" / "model.safetensors")) <= set(keys)
        assert sorted(dict(layers[0].named_parameters())) == sorted(dict(layers[0].target.named_parameters()))

        twin = copy.deepcopy(model)  # a copy's hooks feed the copy's layers; removing them leaves the original's
        fired: list[int] = []
        hf.instrument(twin)[0].hook_resid_pre.register_forward_hook(lambda *a, f=fired: f.append(1))
        layers[0].hook_resid_pre.register_forward_hook(lambda *a, f=fired: f.append(0))
        twin(x)
        assert fired == [1]
        hf.uninstrument(twin)
        model(x)
        assert fired == [1, 0]

        hf.uninstrument(model)
        hf.uninstrument(model)  # idempotent
        assert not hf.is_instrumented(model) and all_hooks(model) == hooks
        assert torch.equal(model(x).logits, ref) and list(model.state_dict()) == keys


def test_llama_every_site_matches_brute_force() -> None:
    model = tiny_llama().double()
    hf.instrument(model)
    probe = gpas_probe.Probe(model, config=ProbeConfig(every=1), schedule=lambda s: True).start(1)
    seen: dict[tuple[int, str], torch.Tensor] = {}

    def keep(layer: int, site: str, t: torch.Tensor) -> None:
        t.retain_grad()
        seen[(layer, site)] = t

    handles = []
    for i, layer in enumerate(model.model.layers):  # the reference reads the model's own modules
        handles += [
            layer.register_forward_pre_hook(lambda m, a, i=i: keep(i, "resid_pre", a[0])),
            layer.register_forward_hook(lambda m, a, o, i=i: keep(i, "resid_post", o)),
            layer.self_attn.register_forward_hook(lambda m, a, o, i=i: keep(i, "attn_out", o[0])),
            layer.post_attention_layernorm.register_forward_pre_hook(lambda m, a, i=i: keep(i, "resid_mid", a[0])),
            layer.mlp.register_forward_hook(lambda m, a, o, i=i: keep(i, "mlp_out", o)),
        ]
    x = ids(3, 12)
    out = model(x, labels=x)
    out.loss.backward()
    for h in handles:
        h.remove()
    grads = {i: math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in layer.parameters()))
             for i, layer in enumerate(model.model.layers)}
    probe.step(1, loss=out.loss)
    df = probe.frame()
    probe.close()
    ones = [torch.ones(3, 12, dtype=torch.bool)]
    for (layer, site), t in seen.items():
        check_stats(df, layer, site, "fwd", stats([t.detach()], ones), rel=1e-10)
        check_stats(df, layer, site, "bwd", stats([t.grad], ones), rel=1e-10)
    for layer in range(3):
        for sub, s, b in (("attn", "resid_pre", "attn_out"), ("mlp", "resid_mid", "mlp_out")):
            s, b = seen[(layer, s)].detach(), seen[(layer, b)].detach()
            ratio = s.norm() / b.norm()
            cos = F.cosine_similarity(s, b, dim=-1).mean()
            assert value(df, layer, sub, "fwd", "shortcut_branch_ratio") == pytest.approx(float(ratio), rel=1e-10)
            assert value(df, layer, sub, "fwd", "shortcut_branch_cos") == pytest.approx(float(cos), rel=1e-8)
        assert value(df, layer, "params", "none", "grad_norm") == pytest.approx(grads[layer], rel=1e-10)
    assert len(seen) == 3 * len(ACTIVATION_SITES) and df.value.notna().all()


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.experts = torch.nn.ModuleList(torch.nn.Linear(H, H) for _ in range(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + sum(e(x) for e in self.experts)


class _Custom(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stack = torch.nn.ModuleList(_Block() for _ in range(3))
        self.checkpointed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.stack:
            x = checkpoint(block, x, use_reentrant=False) if self.checkpointed else block(x)
        return x


def test_generic_search_and_instrument_if_hf() -> None:
    """An unknown model's decoder layers are the shallowest list of one class (not the longer expert
    lists inside); instrument_if_hf instruments only Hugging Face models, once."""
    custom = _Custom()
    assert hf.find_decoder_layers(custom) == ("stack", custom.stack)
    layers = hf.instrument(custom)
    assert [b.target for b in layers] == list(custom.stack) and layers[0].sites == ("resid_pre", "resid_post")
    assert not hf.instrument_if_hf(custom) and not hf.instrument_if_hf(gpas_probe.build_model(
        gpas_probe.ModelConfig(vocab_size=V, hidden_size=H, intermediate_size=64, num_layers=2, num_heads=2)))
    calls: list[str] = []
    for b in layers:
        for site in b.sites:
            getattr(b, f"hook_{site}").register_forward_hook(lambda *a, site=site: calls.append(site))
    frames = []
    for checkpointed in (False, True):  # a checkpoint around the layer's call: its recomputation is not recorded
        custom.checkpointed = checkpointed
        calls.clear()
        with gpas_probe.Probe(custom, config=ProbeConfig(every=1, stats=("activations",)),
                              schedule=lambda s: True) as probe:
            probe.start(1)
            x = torch.randn(2, 5, H, generator=torch.Generator().manual_seed(0), requires_grad=True)
            custom(x).square().mean().backward()
            probe.step(1)
            frames.append(probe.frame().set_index(KEY).value)
        assert calls == ["resid_pre", "resid_post"] * 3
    assert frames[0].index.equals(frames[1].index) and len(frames[0]) == 3 * 2 * 2 * 3
    np.testing.assert_allclose(frames[1].to_numpy(), frames[0].to_numpy(), rtol=1e-6)

    model = tiny_gpt2()
    assert hf.is_hf_model(model) and hf.instrument_if_hf(model) and hf.is_instrumented(model)
    assert not hf.instrument_if_hf(model)
    assert model.transformer.h[0].__class__.__name__ == "GPT2Block"  # layers stay in place


LAYER_CONFIGS = {  # every entry of hf.LAYOUTS: (config class, its tiny settings)
    "LlamaDecoderLayer": ("LlamaConfig", {}), "MistralDecoderLayer": ("MistralConfig", {}),
    "MixtralDecoderLayer": ("MixtralConfig", dict(num_local_experts=2, num_experts_per_tok=1)),
    "Qwen2DecoderLayer": ("Qwen2Config", {}), "Qwen3DecoderLayer": ("Qwen3Config", {}),
    "Qwen2MoeDecoderLayer": ("Qwen2MoeConfig", dict(num_experts=2, num_experts_per_tok=1, moe_intermediate_size=32,
                                                    shared_expert_intermediate_size=32)),
    "Qwen3MoeDecoderLayer": ("Qwen3MoeConfig", dict(num_experts=2, num_experts_per_tok=1, moe_intermediate_size=32)),
    "GemmaDecoderLayer": ("GemmaConfig", {}), "OlmoDecoderLayer": ("OlmoConfig", {}),
    "SmolLM3DecoderLayer": ("SmolLM3Config", {}), "Starcoder2DecoderLayer": ("Starcoder2Config", {}),
    "Gemma2DecoderLayer": ("Gemma2Config", {}), "Gemma3DecoderLayer": ("Gemma3TextConfig", {}),
    "Olmo2DecoderLayer": ("Olmo2Config", {}), "Olmo3DecoderLayer": ("Olmo3Config", {}),
    "Phi3DecoderLayer": ("Phi3Config", {}),
    "GPT2Block": ("GPT2Config", dict(n_layer=2, n_embd=H, n_head=2, n_positions=64, vocab_size=V)),
}


def _tiny(config_name: str, settings: dict) -> torch.nn.Module:
    common = dict(hidden_size=H, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=16, vocab_size=V, max_position_embeddings=64)
    kwargs = {**TOKENS, **(settings if config_name == "GPT2Config" else {**common, **settings})}
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(getattr(transformers, config_name)(**kwargs)).eval()


def test_every_known_layout_is_tested() -> None:
    assert set(LAYER_CONFIGS) == set(hf.LAYOUTS)


@pytest.mark.parametrize("cls", sorted(LAYER_CONFIGS))
def test_known_layouts_are_the_residual_adds(cls: str) -> None:
    """Each layout's sites are the residual stream and the branches: mid = pre + attn, post = mid + mlp."""
    model = _tiny(*LAYER_CONFIGS[cls])
    layers = hf.instrument(model)
    assert type(layers[0].target).__name__ == cls and layers[0].sites == SITES
    seen = {}
    for b in layers:
        for site in SITES:
            getattr(b, f"hook_{site}").register_forward_hook(lambda m, a, o, k=(b.layer, site): seen.__setitem__(k, o))
    model(ids())
    for layer in range(2):
        def get(site: str, layer: int = layer) -> torch.Tensor:
            return seen[(layer, site)]
        assert get("attn_shortcut") is get("resid_pre") and get("mlp_shortcut") is get("resid_mid")
        assert torch.equal(get("resid_pre") + get("attn_out"), get("resid_mid"))
        assert torch.equal(get("resid_mid") + get("mlp_out"), get("resid_post"))
    assert seen[(0, "resid_post")] is seen[(1, "resid_pre")]


def test_unknown_layer_records_what_it_exposes() -> None:
    """GPT-NeoX (parallel residual) is no known layout: the layer's input and output and the attention
    and MLP modules' outputs are recorded; no resid_mid, shortcut or ratio rows, and no NaN."""
    torch.manual_seed(0)
    config = transformers.GPTNeoXConfig(hidden_size=H, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, vocab_size=V, max_position_embeddings=64, **TOKENS)
    model = transformers.GPTNeoXForCausalLM(config)
    layers = hf.instrument(model)
    assert layers[0].layout is None and layers[0].sites == ("resid_pre", "attn_out", "mlp_out", "resid_post")
    with gpas_probe.Probe(model, config=ProbeConfig(every=1), schedule=lambda s: True) as probe:
        probe.start(1)
        x = ids()
        model(x, labels=x).loss.backward()
        probe.step(1)
        df = probe.frame()
    sites = set(df[df.layer >= 0].site)
    assert sites == {"resid_pre", "attn_out", "mlp_out", "resid_post", "params"}
    assert df.value.notna().all() and len(df[df.stat == "grad_norm"]) == 3


def _activation_frame(reentrant: bool | None) -> pd.Series:
    model = tiny_llama().double().train()
    if reentrant is not None:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": reentrant})
    calls: list[int] = []
    for b in hf.instrument(model):
        for site in SITES:
            getattr(b, f"hook_{site}").register_forward_hook(lambda *a: calls.append(1))
    with gpas_probe.Probe(model, config=ProbeConfig(every=1, stats=("activations",)), schedule=lambda s: True) as probe:
        probe.start(1)
        x = ids(2, 12)
        model(x, labels=x, use_cache=False).loss.backward()
        probe.step(1)
        assert len(calls) == 3 * len(SITES)  # each site once: recomputations are not read
        return probe.frame().set_index(KEY).value


def test_gradient_checkpointing_records_each_site_once() -> None:
    """The recomputation in the backward pass is not recorded again. Non-reentrant checkpointing (the
    default) records every site; reentrant runs the layer's first forward without gradients, so only
    the layer-level sites are recorded."""
    plain = _activation_frame(None)
    non_reentrant, reentrant = _activation_frame(False), _activation_frame(True)
    assert non_reentrant.index.equals(plain.index)
    np.testing.assert_allclose(non_reentrant.to_numpy(), plain.to_numpy(), rtol=1e-10)
    assert set(reentrant.index.get_level_values("site")) == {"resid_pre", "resid_post"}
    np.testing.assert_allclose(reentrant.to_numpy(), plain[reentrant.index].to_numpy(), rtol=1e-10)


def test_without_transformers_the_message_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    model = tiny_gpt2()
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.delitem(sys.modules, "gpas_probe.hf.callback", raising=False)
    for call in (lambda: hf.instrument(model), lambda: importlib.import_module("gpas_probe.hf.callback"),
                 lambda: hf.GpasProbeCallback, lambda: hf.load_hf_causal_lm(tmp_path)):
        with pytest.raises(ImportError, match=r'pip install "gpas-probe\[hf\]"'):
            call()
    assert not hf.is_hf_model(model) and not hf.instrument_if_hf(model)  # never imports it
