"""Hugging Face integration (``gpas_probe.hf``): instrumenting, profiles, the drop-in API and the Trainer
callback, against brute-force references built from the models' own tensors. Nothing is downloaded:
every model is a tiny random one built from a config here."""

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
from typer.testing import CliRunner

transformers = pytest.importorskip("transformers")

import gpas_probe  # noqa: E402
from gpas_probe import hf  # noqa: E402
from gpas_probe.analysis.importance import layer_importance as native_importance  # noqa: E402
from gpas_probe.checkpoints import load_checkpoint  # noqa: E402
from gpas_probe.cli.main import app  # noqa: E402
from gpas_probe.evaldata import load_eval_data  # noqa: E402
from gpas_probe.hf.callback import GpasProbeCallback  # noqa: E402
from gpas_probe.model import SITES  # noqa: E402
from gpas_probe.probes import ACTIVATION_SITES, Every, ProbeConfig  # noqa: E402
from gpas_probe.profile import ProfileConfig, profile_many, profile_model  # noqa: E402
from gpas_probe.store import load_run  # noqa: E402

V, H = 64, 32
SEQ, BS, NB = 16, 2, 2
KEY = ["layer", "site", "direction", "stat"]
runner = CliRunner()
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


def _ids(b: int = 2, t: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
              "_forward_hooks_always_called")


def _all_hooks(model: torch.nn.Module) -> int:
    return sum(len(getattr(m, d)) for m in model.modules() for d in HOOK_DICTS)


def _stats(xs: list[torch.Tensor], masks: list[torch.Tensor]) -> dict[str, float]:
    """var/rms/absmax of (B, T, hidden) tensors over the positions the masks keep, pooled."""
    n = sum(int(m.sum()) for m in masks)
    hidden = xs[0].shape[-1]
    var = sum(float(x.double().var(-1, correction=0)[m].sum()) for x, m in zip(xs, masks, strict=True))
    sq = sum(float(x.double().pow(2).sum(-1)[m].sum()) for x, m in zip(xs, masks, strict=True))
    absmax = max(float(x.double().abs().amax(-1)[m].max()) for x, m in zip(xs, masks, strict=True))
    return {"var": var / n, "rms": math.sqrt(sq / (n * hidden)), "absmax": absmax}


def _value(df: pd.DataFrame, layer: int, site: str, direction: str, stat: str) -> float:
    hit = df[(df.layer == layer) & (df.site == site) & (df.direction == direction) & (df.stat == stat)]
    assert len(hit) == 1, (layer, site, direction, stat, len(hit))
    return float(hit.value.iloc[0])


def _check_stats(df: pd.DataFrame, layer: int, site: str, direction: str, ref: dict[str, float],
                 rel: float = 1e-5) -> None:
    for stat, want in ref.items():
        assert _value(df, layer, site, direction, stat) == pytest.approx(want, rel=rel, abs=1e-12), (site, stat)


def _token_file(tmp_path: Path, n: int, seed: int = 3) -> Path:
    path = tmp_path / "tokens.npy"
    np.save(path, np.random.default_rng(seed).integers(0, V, n))
    return path


# -------------------------------------------------------------------------------------- instrument


def test_instrument_changes_nothing_and_uninstrument_restores(tmp_path: Path) -> None:
    for model in (tiny_llama(), tiny_gpt2()):
        x = _ids()
        ref = model(x).logits
        keys, params = list(model.state_dict()), list(model.parameters())
        hooks = _all_hooks(model)
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
        assert not hf.is_instrumented(model) and _all_hooks(model) == hooks
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
    x = _ids(3, 12)
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
        _check_stats(df, layer, site, "fwd", _stats([t.detach()], ones), rel=1e-10)
        _check_stats(df, layer, site, "bwd", _stats([t.grad], ones), rel=1e-10)
    for layer in range(3):
        for sub, s, b in (("attn", "resid_pre", "attn_out"), ("mlp", "resid_mid", "mlp_out")):
            s, b = seen[(layer, s)].detach(), seen[(layer, b)].detach()
            ratio = s.norm() / b.norm()
            cos = F.cosine_similarity(s, b, dim=-1).mean()
            assert _value(df, layer, sub, "fwd", "shortcut_branch_ratio") == pytest.approx(float(ratio), rel=1e-10)
            assert _value(df, layer, sub, "fwd", "shortcut_branch_cos") == pytest.approx(float(cos), rel=1e-8)
        assert _value(df, layer, "params", "none", "grad_norm") == pytest.approx(grads[layer], rel=1e-10)
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
    model(_ids())
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
        x = _ids()
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
        x = _ids(2, 12)
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
                 lambda: hf.load_hf_causal_lm(tmp_path)):
        with pytest.raises(ImportError, match=r'pip install "gpas-probe\[hf\]"'):
            call()
    assert not hf.is_hf_model(model) and not hf.instrument_if_hf(model)  # never imports it


# ----------------------------------------------------------------------------------------- profiles


def test_cli_profile_falls_back_to_transformers(tmp_path: Path) -> None:
    """GPT-2 is not native: ``gpas-probe profile`` loads it with transformers. resid_pre (every layer)
    and resid_post (all but the last, whose output HF reports after ln_f) match the model's own
    ``output_hidden_states`` and their gradients; val_loss and deletion importance match a model
    whose layer list lacks the deleted layer."""
    ckpt = tmp_path / "gpt2-tiny"
    tiny_gpt2().save_pretrained(ckpt)
    data_path = _token_file(tmp_path, 5 * SEQ + 8)  # 5 full windows and a padded one
    out = tmp_path / "profiles"
    res = runner.invoke(app, ["profile", str(ckpt), "--out", str(out), "--data", str(data_path), "--batches", "3",
                              "--batch-size", str(BS), "--seq-len", str(SEQ)])
    assert res.exit_code == 0, res.output
    df = load_run(out / "gpt2-tiny")

    model = transformers.GPT2LMHeadModel.from_pretrained(ckpt).eval()
    data = load_eval_data(data_path)
    batches = list(data.batches(BS, SEQ, 3))
    assert batches[-1][2].sum() < batches[-1][2].numel()
    n_targets = data.num_targets(BS, SEQ, 3)
    fwd: dict[int, list] = {i: [] for i in range(3)}
    bwd: dict[int, list] = {i: [] for i in range(3)}
    masks, loss_sum = [], 0.0
    for ids, labels, mask in batches:
        out_ = model(ids, output_hidden_states=True, use_cache=False)
        loss = F.cross_entropy(out_.logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
        grads = torch.autograd.grad(loss / n_targets, out_.hidden_states[:2])
        for i in range(2):
            fwd[i].append(out_.hidden_states[i].detach())
            bwd[i].append(grads[i])
        masks.append(mask)
        loss_sum += float(loss.detach())
    for layer in range(2):
        _check_stats(df, layer, "resid_pre", "fwd", _stats(fwd[layer], masks))
        _check_stats(df, layer, "resid_pre", "bwd", _stats(bwd[layer], masks))
    _check_stats(df, 0, "resid_post", "fwd", _stats(fwd[1], masks))
    _check_stats(df, 0, "resid_post", "bwd", _stats(bwd[1], masks))
    base = loss_sum / n_targets
    assert _value(df, -1, "model", "none", "val_loss") == pytest.approx(base, rel=1e-6)

    blocks = model.transformer.h
    with torch.no_grad():
        for layer in range(2):
            model.transformer.h = torch.nn.ModuleList(b for i, b in enumerate(blocks) if i != layer)
            deleted = sum(float(F.cross_entropy(model(ids).logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                                                reduction="sum")) for ids, labels, _ in batches) / n_targets
            assert _value(df, layer, "importance", "none", "deletion_delta") == pytest.approx(deleted - base, rel=1e-5)
    assert {"attn_out", "resid_mid", "mlp_out", "attn", "mlp", "angular_n1"} <= set(df.site)  # GPT2Block is known


def test_hf_profile_equals_native_profile_of_the_same_llama(tmp_path: Path) -> None:
    """A LLaMA checkpoint profiled through transformers gives the rows (every site, ratios, parameter
    norms, importance, validation loss) the native loader's model gives."""
    ckpt = tmp_path / "llama"
    tiny_llama().save_pretrained(ckpt)
    data = load_eval_data(_token_file(tmp_path, 2 * SEQ * BS + 3))
    native = load_checkpoint(ckpt, dtype=torch.float64)
    ours = hf.load_hf_causal_lm(ckpt, dtype=torch.float64)
    config = ProfileConfig.of(batches=NB + 1, batch_size=BS, seq_len=SEQ)
    want = profile_model(native, data, config, step=7).set_index(KEY).value.sort_index()
    got = profile_model(ours, data, config, step=7).set_index(KEY).value.sort_index()
    assert not hf.is_instrumented(ours)  # instrumented only for the call
    assert got.index.equals(want.index) and len(got) > 100
    # both compute RoPE tables in fp32 (by a product and by an outer product): float64 agrees to ~1e-7
    np.testing.assert_allclose(got.to_numpy(), want.to_numpy(), rtol=1e-6, atol=1e-9)

    direct = hf.layer_importance(ours, data.batches(BS, SEQ, NB), normalize_rows=True)
    ref = native_importance(native, data.batches(BS, SEQ, NB), normalize_rows=True)
    for name in ("deletion", "angular", "block_influence"):
        pd.testing.assert_frame_equal(direct[name], ref[name], rtol=1e-6)


def test_profile_backends_and_errors(tmp_path: Path) -> None:
    ckpt = tmp_path / "gpt2-tiny"
    tiny_gpt2().save_pretrained(ckpt)
    kw = dict(data=_token_file(tmp_path, 200), batches=1, batch_size=2, seq_len=8)
    with pytest.raises(ValueError, match="'GPT2LMHeadModel' is not supported natively"):
        profile_many([ckpt], tmp_path / "a", ProfileConfig.of(backend="native", **kw))
    with pytest.raises(ValueError, match="applies only to checkpoints loaded natively"):
        profile_many([ckpt], tmp_path / "a", ProfileConfig.of(norm="post", **kw))
    with pytest.raises(ValueError, match="unknown backend"):
        profile_many([ckpt], tmp_path / "a", ProfileConfig.of(backend="jax", **kw))
    native = tmp_path / "ours"
    gpas_probe.save_checkpoint(gpas_probe.build_model(gpas_probe.ModelConfig(
        vocab_size=V, hidden_size=H, intermediate_size=64, num_layers=2, num_heads=2, gpas=True)), native)
    with pytest.raises(ValueError, match="the weights do not match LlamaForCausalLM.*gpas"):
        profile_many([native], tmp_path / "a", ProfileConfig.of(backend="hf", **kw))  # gates are no LLaMA weights
    (run,) = profile_many([native], tmp_path / "b", ProfileConfig.of(backend="auto", importance=False, **kw))
    assert "gpas" in set(load_run(run).site)  # ours load natively
    assert not (tmp_path / "a").exists()


# --------------------------------------------------------------------------------------- training


def test_attach_in_a_plain_loop_writes_a_run(tmp_path: Path) -> None:
    model = tiny_llama().train()
    hf.instrument(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    probe = gpas_probe.attach(model, out=tmp_path / "run", every=2, optimizer=optimizer)
    losses = {}
    for step in range(1, 6):
        x = _ids(2, 12, seed=step)
        loss = model(x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        probe.step(step, loss=loss)
        losses[step] = float(loss.detach())
    probe.close()
    df = gpas_probe.load_run(tmp_path / "run")
    steps = [s for s in range(1, 6) if Every(2)(s)]
    assert sorted(set(df[df.layer >= 0].step)) == steps
    assert sorted(set(df.step)) == [1, 2, 3, 4, 5]  # the loss (a CPU tensor here) on every step
    for s in range(1, 6):
        assert _value(df[df.step == s], -1, "model", "none", "loss") == pytest.approx(losses[s], rel=1e-6)
    assert set(ACTIVATION_SITES) <= set(df.site) and df.value.notna().all()
    assert gpas_probe.probes.read_meta(tmp_path / "run")["model_config"]["model_type"] == "llama"


def _dataset(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(3, V, (SEQ,), generator=g)
        mask = torch.ones(SEQ, dtype=torch.long)
        mask[SEQ - 1 - i % 4:] = 0 if i % 2 else 1  # some rows right-padded
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return rows


def test_trainer_callback_writes_a_run_that_plots(tmp_path: Path) -> None:
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "trainer"), max_steps=4, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        per_device_eval_batch_size=4, learning_rate=1e-3, eval_strategy="steps", eval_steps=2, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
    callback = GpasProbeCallback(tmp_path / "run", every=2)
    model = tiny_llama().train()
    first: list[tuple[torch.Tensor, torch.Tensor]] = []  # (embeddings, attention mask) of step 1's micro-batches
    masks: list[torch.Tensor] = []
    model.register_forward_pre_hook(lambda m, a, kw: masks.append(kw["attention_mask"]) if m.training else None,
                                    with_kwargs=True)
    model.model.embed_tokens.register_forward_hook(
        lambda m, a, out: first.append((out.detach(), masks[-1].bool())) if m.training and len(first) < 2 else None)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_dataset(16, 0),
                                   eval_dataset=_dataset(4, 1), callbacks=[callback])
    trainer.train()
    assert callback.probe is None and not model._forward_hooks and len(model._forward_pre_hooks) == 1  # ours only

    df = load_run(tmp_path / "run")
    assert sorted(set(df[df.layer >= 0].step)) == [1, 2, 4]
    assert sorted(set(df.step)) == [1, 2, 3, 4]  # model rows on every step
    logs = {(h["step"], k): v for h in trainer.state.log_history for k, v in h.items()}
    for step in (1, 2, 4):
        rows = df[df.step == step]
        assert _value(rows, -1, "model", "none", "loss") == pytest.approx(logs[(step, "loss")], rel=1e-6)
        assert _value(rows, -1, "model", "none", "grad_norm") == pytest.approx(logs[(step, "grad_norm")], rel=1e-5)
        assert _value(rows, -1, "model", "none", "lr") == pytest.approx(logs[(step, "learning_rate")], rel=1e-6)
        assert set(ACTIVATION_SITES) <= set(rows.site)
    for step in (2, 4):
        assert _value(df[df.step == step], -1, "model", "none", "val_loss") == pytest.approx(
            logs[(step, "eval_loss")], rel=1e-5)
    assert df.value.notna().all()
    # step 1 pools its two micro-batches and leaves padding out: layer 0's input is the embedding output
    assert not all(bool(m.all()) for _, m in first)
    _check_stats(df[df.step == 1], 0, "resid_pre", "fwd", _stats([e for e, _ in first], [m for _, m in first]))

    png = tmp_path / "variance.png"
    res = runner.invoke(app, ["plot", "variance", str(tmp_path / "run"), "-o", str(png)])
    assert res.exit_code == 0, res.output
    assert png.is_file() and png.stat().st_size > 0
