"""The GPAS operator against hand-written formulas (DESIGN §3)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gpas_probe.config import ModelConfig
from gpas_probe.gpas import GPAS, NaiveScale, clip_gate_grad_, gate_parameters, gpas, gpas_modules, naive_scale
from gpas_probe.model import build_model

# float32-representable, so a gate built in float32 then cast to float64 holds exactly this value;
# +-1.28125 lie next to the extremum and the zero of the scale 1 - silu(alpha).
ALPHAS = [-3.0, -1.28125, -0.5, 0.0, 0.375, 1.28125, 2.5]


def _sigmoid(a: float) -> float:
    return 1.0 / (1.0 + math.exp(-a))


def _silu(a: float) -> float:
    return a * _sigmoid(a)


def _dsilu(a: float) -> float:
    s = _sigmoid(a)
    return s * (1.0 + a * (1.0 - s))


def _x(seed: int = 0, shape: tuple[int, ...] = (3, 5, 7)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_forward_value_is_scaled_input(alpha: float) -> None:
    x = _x()
    a = torch.tensor(alpha, dtype=torch.float64)
    expected = (1.0 - _silu(alpha)) * x
    torch.testing.assert_close(gpas(x, a), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(naive_scale(x, a), expected, rtol=1e-12, atol=1e-12)
    m = GPAS(alpha).double()
    torch.testing.assert_close(m(x), expected, rtol=1e-12, atol=1e-12)
    assert m.scale.item() == pytest.approx(1.0 - _silu(alpha), abs=1e-12)


def test_fresh_gate_is_exact_identity() -> None:
    x = torch.randn(4, 9)
    assert torch.equal(GPAS()(x), x)
    assert torch.equal(NaiveScale()(x), x)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_input_gradient_is_upstream_gradient(alpha: float) -> None:
    x = _x(1).requires_grad_()
    g = _x(2)
    m = GPAS(alpha).double()
    m(x).backward(g)
    assert torch.equal(x.grad, g)  # identity Jacobian, bit for bit


@pytest.mark.parametrize("alpha", ALPHAS)
def test_gate_gradient_formula(alpha: float) -> None:
    x, g = _x(3), _x(4)
    m = GPAS(alpha).double()
    m(x).backward(g)
    expected = -_dsilu(alpha) * float((g * x).sum())
    assert m.alpha.grad.item() == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_dsilu_at_zero_is_half() -> None:
    m = GPAS(0.0).double()
    x, g = _x(5), _x(6)
    m(x).backward(g)
    assert m.alpha.grad.item() == pytest.approx(-0.5 * float((g * x).sum()), rel=1e-12)


@pytest.mark.parametrize("alpha", [-0.75, 0.0, 0.875])
def test_gate_gradient_sums_over_sites(alpha: float) -> None:
    """One gate at two sites of a small residual chain: dL/dalpha sums both sites' contributions."""
    x0 = _x(7, (4, 6)).requires_grad_()
    w = _x(8, (6, 6))
    m = GPAS(alpha).double()
    h = m(x0 + x0 @ w)
    y = m(h + torch.tanh(h))
    loss = (y * _x(9, (4, 6))).sum()
    loss.backward()

    # Independent reference: the two site inputs and the upstream gradient at each site, by hand.
    s = 1.0 - _silu(alpha)
    with torch.no_grad():
        u1 = x0 + x0 @ w  # first site's input
        h_val = s * u1
        u2 = h_val + torch.tanh(h_val)  # second site's input
        g2 = _x(9, (4, 6))  # dL/dy
        # dL/dh through y = G(h + tanh h), identity Jacobian at the site: g2 * (1 + tanh'(h))
        g1 = g2 * (1 + (1 - torch.tanh(h_val) ** 2))
    expected = -_dsilu(alpha) * (float((g1 * u1).sum()) + float((g2 * u2).sum()))
    assert m.alpha.grad.item() == pytest.approx(expected, rel=1e-10)
    # Input gradient through both identity Jacobians: dL/dx0 = g1 (I + W^T)
    torch.testing.assert_close(x0.grad, g1 + g1 @ w.T, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_naive_scale_gradients(alpha: float) -> None:
    x = _x(10).requires_grad_()
    g = _x(11)
    m = NaiveScale(alpha).double()
    m(x).backward(g)
    torch.testing.assert_close(x.grad, (1.0 - _silu(alpha)) * g, rtol=1e-12, atol=1e-12)
    # Same gate gradient as GPAS: the value path through alpha is identical.
    expected = -_dsilu(alpha) * float((g * x.detach()).sum())
    assert m.alpha.grad.item() == pytest.approx(expected, rel=1e-10, abs=1e-12)


def _gated(n: int) -> nn.Module:
    return nn.ModuleList(GPAS(0.1 * i) for i in range(n))


def test_clip_gate_grad_joint_norm() -> None:
    model = _gated(3)
    grads = [3.0, -4.0, 12.0]  # joint norm 13
    for m, v in zip(model, grads, strict=True):
        m.alpha.grad = torch.tensor(v)
    norm = clip_gate_grad_(model, 0.0)  # measure only
    assert norm.item() == pytest.approx(13.0)
    assert [m.alpha.grad.item() for m in model] == grads

    norm = clip_gate_grad_(model, 6.5)
    assert norm.item() == pytest.approx(13.0)
    for m, v in zip(model, grads, strict=True):
        assert m.alpha.grad.item() == pytest.approx(v * 6.5 / 13.0, rel=1e-5)
    after = math.sqrt(sum(m.alpha.grad.item() ** 2 for m in model))
    assert after == pytest.approx(6.5, rel=1e-5)

    # Below the threshold nothing changes.
    before = [m.alpha.grad.item() for m in model]
    clip_gate_grad_(model, 100.0)
    assert [m.alpha.grad.item() for m in model] == before


def test_clip_gate_grad_without_grads_is_zero() -> None:
    assert clip_gate_grad_(_gated(2), 1.0).item() == 0.0
    assert clip_gate_grad_(nn.Linear(2, 2), 1.0).item() == 0.0


def test_fixed_gate_gets_no_grad() -> None:
    m = GPAS(0.4, learnable=False)
    assert not m.alpha.requires_grad
    assert m.alpha.item() == pytest.approx(0.4)
    x = torch.randn(5, requires_grad=True)
    m(x).sum().backward()
    assert m.alpha.grad is None
    assert torch.equal(x.grad, torch.ones(5))


def test_fixed_gates_in_model_get_no_grad() -> None:
    cfg = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_heads=2, num_layers=2,
                      gpas=True, gpas_learnable=False, gpas_init=0.5)
    model = build_model(cfg)
    ids = torch.randint(0, 32, (2, 5))
    model(ids, ids).loss.backward()
    gates = list(gate_parameters(model))
    assert len(gates) == 2
    assert all(not p.requires_grad and p.grad is None and p.item() == pytest.approx(0.5) for p in gates)


def test_gpas_modules_finds_shared_gates_once() -> None:
    shared = GPAS()

    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = shared, shared, NaiveScale()

    found = gpas_modules(Two())
    assert len(found) == 2 and found[0] is shared and isinstance(found[1], NaiveScale)

    for gran, per_layer in (("layer", 1), ("sublayer", 2)):
        cfg = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_heads=2, num_layers=3,
                          gpas=True, gpas_granularity=gran)
        model = build_model(cfg)
        mods = gpas_modules(model)
        assert len(mods) == 3 * per_layer
        assert len({id(m) for m in mods}) == len(mods)
        assert len(list(gate_parameters(model))) == 3 * per_layer


@pytest.mark.parametrize("granularity", ["layer", "sublayer"])
def test_model_gate_gradients_per_site(granularity: str) -> None:
    """In the model, the layer's one gate accumulates both sites; sub-layer gates each get their own."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_heads=2, num_layers=1, gpas=True,
                      gpas_granularity=granularity)
    model = build_model(cfg).double()
    ids = torch.randint(0, 32, (2, 6))
    block = model.layers[0]
    store: dict[str, torch.Tensor] = {}
    block.hook_resid_mid.register_forward_hook(lambda m, i, o: store.__setitem__("mid", o))
    block.hook_resid_post.register_forward_hook(lambda m, i, o: store.__setitem__("post", o))
    out = model(ids, ids)
    # Total gradients w.r.t. the two gate outputs (the "mid" one includes the path through the MLP).
    g_mid, g_post = torch.autograd.grad(out.loss, [store["mid"], store["post"]], retain_graph=True)
    out.loss.backward()
    # Pre family at alpha = 0: each gate's input equals its output, and silu'(0) = 1/2.
    site_mid = -0.5 * float((g_mid * store["mid"].detach()).sum())
    site_post = -0.5 * float((g_post * store["post"].detach()).sum())
    gates = block.gates()
    if granularity == "layer":
        assert len(gates) == 1
        assert gates[0].alpha.grad.item() == pytest.approx(site_mid + site_post, rel=1e-8, abs=1e-12)
    else:
        assert len(gates) == 2
        assert gates[0].alpha.grad.item() == pytest.approx(site_mid, rel=1e-8, abs=1e-12)
        assert gates[1].alpha.grad.item() == pytest.approx(site_post, rel=1e-8, abs=1e-12)
