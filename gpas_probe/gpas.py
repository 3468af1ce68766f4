"""Gradient-Preserving Activation Scaling (DESIGN §3).

``y = x - SiLU(alpha) * sg(x)``: the forward value is ``(1 - SiLU(alpha)) * x`` while the Jacobian
``dy/dx`` is exactly the identity. The gate's own gradient is
``dL/dalpha = -SiLU'(alpha) * sum(<dL/dy, x>)`` over every element and every site the gate serves.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn


def gpas(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Functional GPAS: ``x - silu(alpha) * x.detach()``."""
    return x - F.silu(alpha).to(x.dtype) * x.detach()


def naive_scale(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """The paper's ablation: ``(1 - silu(alpha)) * x`` with the gradient scaled too."""
    return x * (1 - F.silu(alpha)).to(x.dtype)


class GPAS(nn.Module):
    """One scalar gate ``alpha`` (init 0: a fresh model computes exactly the baseline).

    ``learnable=False`` freezes ``alpha`` at ``init`` (``requires_grad=False``).
    """

    def __init__(self, init: float = 0.0, learnable: bool = True) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(float(init)), requires_grad=learnable)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gpas(x, self.alpha)

    @property
    def scale(self) -> torch.Tensor:
        """The forward multiplier ``1 - silu(alpha)``."""
        return 1 - F.silu(self.alpha.detach())

    def extra_repr(self) -> str:
        return f"alpha={self.alpha.item():.4g}, learnable={self.alpha.requires_grad}"


class NaiveScale(GPAS):
    """Same gate, no stop-gradient: the backward pass is scaled by ``1 - silu(alpha)`` as well."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return naive_scale(x, self.alpha)


def gpas_modules(model: nn.Module) -> list[GPAS]:
    """Every distinct GPAS (or NaiveScale) module of ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, GPAS)]


def gate_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """The ``alpha`` of each GPAS module (shared gates appear once)."""
    for m in gpas_modules(model):
        yield m.alpha


def clip_gate_grad_(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the gates' gradients by one joint norm; returns the norm before clipping.

    ``max_norm <= 0`` only measures. Gates without a gradient are skipped.
    """
    grads = [p.grad for p in gate_parameters(model) if p.grad is not None]
    if not grads:
        return torch.zeros(())
    total = torch.linalg.vector_norm(torch.stack([g.detach().float().reshape(()) for g in grads]))
    if max_norm > 0:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype))
    return total
