"""Every normalization scheme, with and without GPAS, against a straight-line reference of DESIGN §4.

The reference below is written from the equations alone: its own RMSNorm, rotary embedding, causal
softmax attention (explicit mask, no SDPA) and SwiGLU, in float64, fed with the model's weights.
"""

from __future__ import annotations

import copy
import math
import zlib
from typing import Any

import pytest
import torch

from gpas_probe.config import ModelConfig, NormScheme
from gpas_probe.model import build_model
from gpas_probe.model.layers import RMSNorm

EPS = 1e-6
SMALL = dict(vocab_size=48, hidden_size=32, intermediate_size=40, num_heads=4, num_kv_heads=2, num_layers=4,
             max_seq_len=16)


# ----------------------------------------------------------------------------- reference
def _rmsnorm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + EPS)


def _rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """x: (B, heads, T, d); pairs (i, i + d/2) rotate by angle t * theta^(-2i/d) (LLaMA convention)."""
    d, t = x.shape[-1], x.shape[-2]
    inv = torch.tensor([theta ** (-2.0 * i / d) for i in range(d // 2)], dtype=torch.float64)
    ang = torch.arange(t, dtype=torch.float64)[:, None] * inv[None, :]  # (T, d/2)
    cos, sin = torch.cos(ang), torch.sin(ang)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    y = x @ w.T
    return y if b is None else y + b


def _attention(x: torch.Tensor, p: dict[str, Any], n_head: int, n_kv: int, theta: float) -> torch.Tensor:
    B, T, _ = x.shape
    hd = p["q"].shape[0] // n_head
    q = _linear(x, p["q"], p.get("q_bias")).view(B, T, n_head, hd).transpose(1, 2)
    k = _linear(x, p["k"], p.get("k_bias")).view(B, T, n_kv, hd).transpose(1, 2)
    v = _linear(x, p["v"], p.get("v_bias")).view(B, T, n_kv, hd).transpose(1, 2)
    q, k = _rope(q, theta), _rope(k, theta)
    group = n_head // n_kv  # query head h reads key/value head h // group
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)  # (B, nh, T, T)
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    att = torch.exp(scores - scores.amax(-1, keepdim=True))
    att = att / att.sum(-1, keepdim=True)
    y = (att @ v).transpose(1, 2).reshape(B, T, n_head * hd)
    return _linear(y, p["o"])


def _swiglu(x: torch.Tensor, p: dict[str, Any]) -> torch.Tensor:
    g = _linear(x, p["gate"])
    return _linear(g * torch.sigmoid(g) * _linear(x, p["up"]), p["down"])


def _gate(x: torch.Tensor, alpha: float | None) -> torch.Tensor:
    if alpha is None:
        return x
    return (1.0 - alpha / (1.0 + math.exp(-alpha))) * x


def reference_forward(w: dict[str, Any], ids: torch.Tensor, scheme: str, num_heads: int, num_kv_heads: int,
                      post_layers: int | None = None, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden states before the final norm, logits) by DESIGN §4, written out per scheme."""
    L = len(w["layers"])
    x = w["embed"][ids]
    for layer, p in enumerate(w["layers"]):
        A = lambda z: _attention(z, p, num_heads, num_kv_heads, theta)  # noqa: B023
        F = lambda z: _swiglu(z, p)  # noqa: B023
        ga, gf = p["alpha_attn"], p["alpha_mlp"]
        if scheme == "mixln":
            fam = "post" if layer < post_layers else "pre"
        elif scheme == "deepnorm":
            fam = "deepnorm"
        elif scheme in ("pre", "lns", "lns-gain", "post", "sandwich"):
            fam = scheme
        else:
            raise AssertionError(scheme)

        if fam in ("pre", "lns-gain"):  # h = G(x + A(N1 x)); y = G(h + F(N2 h))
            h = _gate(x + A(_rmsnorm(x, p["n1"])), ga)
            x = _gate(h + F(_rmsnorm(h, p["n2"])), gf)
        elif fam == "lns":  # the normalized input times the fixed 1/sqrt(l+1)
            c = 1.0 / math.sqrt(layer + 1)
            h = _gate(x + A(_rmsnorm(x, p["n1"]) * c), ga)
            x = _gate(h + F(_rmsnorm(h, p["n2"]) * c), gf)
        elif fam == "sandwich":  # h = G(x + N1b(A(N1 x)))
            h = _gate(x + _rmsnorm(A(_rmsnorm(x, p["n1"])), p["n1b"]), ga)
            x = _gate(h + _rmsnorm(F(_rmsnorm(h, p["n2"])), p["n2b"]), gf)
        elif fam == "post":  # h = N1(G(x) + A x)
            h = _rmsnorm(_gate(x, ga) + A(x), p["n1"])
            x = _rmsnorm(_gate(h, gf) + F(h), p["n2"])
        else:  # deepnorm: h = N1(a G(x) + A x), a = (2L)^(1/4)
            a = (2 * L) ** 0.25
            h = _rmsnorm(a * _gate(x, ga) + A(x), p["n1"])
            x = _rmsnorm(a * _gate(h, gf) + F(h), p["n2"])
    return x, _linear(_rmsnorm(x, w["norm"]), w["lm_head"])


# ----------------------------------------------------------------------------- weights
def _alpha(mod: torch.nn.Module) -> float | None:
    return float(mod.alpha.detach()) if hasattr(mod, "alpha") else None


def model_weights(model: torch.nn.Module) -> dict[str, Any]:
    """The model's weights as plain float64 tensors, named by the roles of DESIGN §4."""
    d = lambda t: t.detach().double().clone()  # noqa: E731
    layers = []
    for block in model.layers:
        at, ml = block.attn, block.mlp
        p: dict[str, Any] = {n: d(getattr(at, f"{n}_proj").weight) for n in "qkvo"}
        for n in "qkv":
            if getattr(at, f"{n}_proj").bias is not None:
                p[f"{n}_bias"] = d(getattr(at, f"{n}_proj").bias)
        p.update({n: d(getattr(ml, f"{n}_proj").weight) for n in ("gate", "up", "down")})
        post = isinstance(block.attn_out_norm, RMSNorm)
        if post:
            p["n1"], p["n2"] = d(block.attn_out_norm.weight), d(block.mlp_out_norm.weight)
            p["alpha_attn"], p["alpha_mlp"] = _alpha(block.attn_shortcut_gate), _alpha(block.mlp_shortcut_gate)
        else:
            p["n1"], p["n2"] = d(block.attn_norm.weight), d(block.mlp_norm.weight)
            if isinstance(block.attn_branch_norm, RMSNorm):
                p["n1b"], p["n2b"] = d(block.attn_branch_norm.weight), d(block.mlp_branch_norm.weight)
            p["alpha_attn"], p["alpha_mlp"] = _alpha(block.attn_out_gate), _alpha(block.mlp_out_gate)
        layers.append(p)
    return {"embed": d(model.embed_tokens.weight), "layers": layers, "norm": d(model.norm.weight),
            "lm_head": d(model.lm_head.weight)}


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Make every norm weight, bias and gate matter (init leaves them at 1, 0 and 0)."""
    g = torch.Generator().manual_seed(seed)
    for name, prm in model.named_parameters():
        if prm.ndim == 1:  # norm weights and biases
            prm.copy_(1.0 + 0.3 * torch.randn(prm.shape, generator=g) if name.endswith("weight")
                      else 0.3 * torch.randn(prm.shape, generator=g))
        elif prm.ndim == 0:  # GPAS gates, a different value per gate
            prm.fill_(float(torch.empty(()).uniform_(-1.2, 1.2, generator=g)))
    # Larger head weights so differences show in the logits as well as in the hidden states.
    model.lm_head.weight.normal_(0, 0.3, generator=g)


def _model(scheme: str, gates: str | None, seed: int = 0, **kw: Any):
    """A seeded model; ``gates`` is None (no GPAS) or the gate granularity."""
    cfg = dict(SMALL, norm=scheme, **kw)
    if gates is not None:
        cfg.update(gpas=True, gpas_granularity=gates)
    torch.manual_seed(seed)
    return build_model(ModelConfig(**cfg))


# ----------------------------------------------------------------------------- tests
SCHEMES = [s.value for s in NormScheme]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_fresh_gpas_model_equals_baseline(scheme: str) -> None:
    base, gated = _model(scheme, None, seed=3), _model(scheme, "layer", seed=3)
    gated_params = dict(gated.named_parameters())
    for name, prm in base.named_parameters():
        assert torch.equal(prm, gated_params[name]), name  # same seed, same weights
    extra = set(gated_params) - {n for n, _ in base.named_parameters()}
    assert extra and all(gated_params[n].item() == 0.0 for n in extra)  # only the gates, all zero
    ids = torch.randint(0, SMALL["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(base(ids).logits, gated(ids).logits)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_fresh_gpas_model_equals_baseline_copied_weights(scheme: str) -> None:
    base, gated = _model(scheme, None, seed=0), _model(scheme, "sublayer", seed=1)
    missing, unexpected = gated.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and missing and all("gate" in n for n in missing)
    ids = torch.randint(0, SMALL["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(base(ids).logits, gated(ids).logits)


CASES = [(s, g) for s in SCHEMES for g in (None, "layer", "sublayer")]


@pytest.mark.parametrize(("scheme", "gpas_mode"), CASES)
@pytest.mark.parametrize("qkv_bias", [False, True])
def test_forward_matches_reference(scheme: str, gpas_mode: str | None, qkv_bias: bool) -> None:
    model = _model(scheme, gpas_mode, qkv_bias=qkv_bias)
    _randomize(model, seed=zlib.crc32(f"{scheme}-{gpas_mode}-{qkv_bias}".encode()) % 1000)
    _check(model, scheme)


@pytest.mark.parametrize("scheme", ["pre", "post", "deepnorm"])
def test_naive_scaling_forward_matches_reference(scheme: str) -> None:
    """The naive-scaling ablation computes the same forward values as GPAS."""
    model = _model(scheme, "layer", gpas_mode="naive")
    _randomize(model, seed=11)
    _check(model, scheme)


@pytest.mark.parametrize("post_layers", [0, 3, 4])
@pytest.mark.parametrize("gpas_mode", [None, "layer"])
def test_mixln_custom_post_layers(post_layers: int, gpas_mode: str | None) -> None:
    model = _model("mixln", gpas_mode, post_layers=post_layers)
    assert model.config.post_layers == post_layers
    _randomize(model, seed=post_layers)
    _check(model, "mixln")


def test_mixln_default_post_layers() -> None:
    for layers in (1, 4, 7, 8):
        assert ModelConfig(**dict(SMALL, num_layers=layers, norm="mixln")).post_layers == layers // 4


def test_layer_gates_shared_sublayer_gates_distinct() -> None:
    for scheme in SCHEMES:
        for mode, same in (("layer", True), ("sublayer", False)):
            model = _model(scheme, mode)
            _randomize(model, seed=5)
            for p in model_weights(model)["layers"]:
                assert p["alpha_attn"] is not None and p["alpha_mlp"] is not None
                assert (p["alpha_attn"] == p["alpha_mlp"]) is same


def _check(model: torch.nn.Module, scheme: str) -> None:
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (2, 11), generator=torch.Generator().manual_seed(7))
    ref_hidden, ref_logits = reference_forward(model_weights(model), ids, scheme, cfg.num_heads, cfg.num_kv_heads,
                                               cfg.post_layers, cfg.rope_theta)
    # In float64 the model must agree with the reference to rounding (measured: under 1e-7); in float32,
    # to float32's rounding through a deep stack (errors up to ~1.3e-5 on logits of size ~1 were seen).
    for dtype, tol in ((torch.float64, 1e-6), (torch.float32, 1e-4)):
        run = copy.deepcopy(model).to(dtype)
        with torch.no_grad():
            hidden = run.hidden_states(ids)
            logits = run(ids).logits
        torch.testing.assert_close(hidden.double(), ref_hidden, rtol=tol, atol=tol)
        torch.testing.assert_close(logits.double(), ref_logits, rtol=tol, atol=tol)


# ----------------------------------------------------------------------------- init
def _std(t: torch.Tensor) -> float:
    return float(t.detach().double().std())


def test_default_init() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_heads=4, num_layers=2, gpas=True)
    model = build_model(cfg)
    assert _std(model.embed_tokens.weight) == pytest.approx(math.sqrt(2 / 5), rel=0.03)
    assert _std(model.lm_head.weight) == pytest.approx(0.02, rel=0.03)
    for block in model.layers:
        for lin in (block.attn.q_proj, block.attn.k_proj, block.attn.v_proj, block.attn.o_proj,
                    block.mlp.gate_proj, block.mlp.up_proj, block.mlp.down_proj):
            assert _std(lin.weight) == pytest.approx(0.02, rel=0.05)
            assert abs(float(lin.weight.detach().mean())) < 0.002
        assert torch.equal(block.attn_norm.weight, torch.ones(128))
        assert torch.equal(block.mlp_norm.weight, torch.ones(128))
        assert all(g.alpha.item() == 0.0 and g.alpha.requires_grad for g in block.gates())
    assert torch.equal(model.norm.weight, torch.ones(128))
    plain = build_model(ModelConfig(**{**cfg.to_dict(), "embed_init_std": 0.02}))
    assert _std(plain.embed_tokens.weight) == pytest.approx(0.02, rel=0.03)


def test_deepnorm_init() -> None:
    torch.manual_seed(0)
    L, h, f = 3, 128, 256
    cfg = ModelConfig(vocab_size=512, hidden_size=h, intermediate_size=f, num_heads=4, num_kv_heads=2,
                      num_layers=L, norm="deepnorm")
    model = build_model(cfg)
    gain = (8 * L) ** -0.25
    kv = 2 * (h // 4)

    def xavier(fan_in: int, fan_out: int, g: float) -> float:
        return g * math.sqrt(2.0 / (fan_in + fan_out))

    for block in model.layers:
        at, ml = block.attn, block.mlp
        expected = {
            at.q_proj: xavier(h, h, 1.0), at.k_proj: xavier(h, kv, 1.0),
            at.v_proj: xavier(h, kv, gain), at.o_proj: xavier(h, h, gain),
            ml.gate_proj: xavier(h, f, gain), ml.up_proj: xavier(h, f, gain), ml.down_proj: xavier(f, h, gain),
        }
        for lin, std in expected.items():
            assert _std(lin.weight) == pytest.approx(std, rel=0.05)
        assert torch.equal(block.attn_out_norm.weight, torch.ones(h))
    assert _std(model.embed_tokens.weight) == pytest.approx(math.sqrt(2 / 5), rel=0.03)
    assert _std(model.lm_head.weight) == pytest.approx(0.02, rel=0.03)


def test_lns_gain_init() -> None:
    model = _model("lns-gain", "layer")
    for layer, block in enumerate(model.layers):
        want = torch.full((SMALL["hidden_size"],), 1 / math.sqrt(layer + 1))
        assert torch.equal(block.attn_norm.weight, want) and torch.equal(block.mlp_norm.weight, want)
        assert block.attn_norm.weight.requires_grad
    assert torch.equal(model.norm.weight, torch.ones(SMALL["hidden_size"]))
    # lns (fixed factor) keeps unit gains: the factor is not a parameter.
    for block in _model("lns", None).layers:
        assert torch.equal(block.attn_norm.weight, torch.ones(SMALL["hidden_size"]))


def test_lns_gain_fresh_forward_equals_lns() -> None:
    """At init, lns-gain (gain 1/sqrt(l+1)) computes what lns (fixed factor 1/sqrt(l+1)) does."""
    a, b = _model("lns", "layer", seed=4), _model("lns-gain", "layer", seed=4)
    ids = torch.randint(0, SMALL["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, b(ids).logits, rtol=1e-5, atol=1e-6)
    # and the unrandomized lns-gain model matches the pre-family reference with its own gains
    _check(b, "lns-gain")
