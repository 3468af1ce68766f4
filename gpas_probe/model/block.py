"""The decoder layer: one ``Block`` whose slots are filled per scheme (DESIGN §4).

Each sub-layer (attention, then MLP) computes, with ``N*`` norms or identities and ``G*`` GPAS gates
or identities::

    branch   = branch_norm(sublayer(in_norm(x) * in_scale))
    shortcut = shortcut_scale * shortcut_gate(x)
    out      = out_gate(out_norm(shortcut + branch))

pre/lns fill ``in_norm`` and ``out_gate``; sandwich adds ``branch_norm``; post/deepnorm fill
``out_norm`` and ``shortcut_gate`` (so the sub-layer sees the unscaled input); deepnorm sets
``shortcut_scale = (2L)^(1/4)``; lns sets ``in_scale = 1/sqrt(l+1)``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from gpas_probe.config import Family, GateGranularity, ModelConfig, NormScheme, ScalingMode
from gpas_probe.gpas import GPAS, NaiveScale
from gpas_probe.model.hooks import ProbedLayer
from gpas_probe.model.layers import MLP, Attention, RMSNorm


def _gates(config: ModelConfig) -> tuple[nn.Module, nn.Module]:
    """The (attention, MLP) gates of one layer: identities, one shared gate, or two."""
    if not config.gpas:
        return nn.Identity(), nn.Identity()
    cls = NaiveScale if config.gpas_mode is ScalingMode.NAIVE else GPAS

    def make() -> GPAS:
        return cls(config.gpas_init, learnable=config.gpas_learnable)

    if config.gpas_granularity is GateGranularity.SUBLAYER:
        return make(), make()
    shared = make()
    return shared, shared


def _scaled(x: torch.Tensor, s: float) -> torch.Tensor:
    return x if s == 1.0 else x * s


class Block(ProbedLayer):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__(layer)
        self.family = family = config.family(layer)
        h, eps = config.hidden_size, config.rms_eps

        def norm_if(cond: bool) -> nn.Module:
            return RMSNorm(h, eps) if cond else nn.Identity()

        pre_like, post_like = family is not Family.POST, family is Family.POST
        self.attn, self.mlp = Attention(config), MLP(config)
        self.attn_norm, self.mlp_norm = norm_if(pre_like), norm_if(pre_like)
        self.attn_branch_norm = norm_if(family is Family.SANDWICH)
        self.mlp_branch_norm = norm_if(family is Family.SANDWICH)
        self.attn_out_norm, self.mlp_out_norm = norm_if(post_like), norm_if(post_like)

        gate_attn, gate_mlp = _gates(config)
        ident = nn.Identity
        self.attn_shortcut_gate, self.mlp_shortcut_gate = (gate_attn, gate_mlp) if post_like else (ident(), ident())
        self.attn_out_gate, self.mlp_out_gate = (ident(), ident()) if post_like else (gate_attn, gate_mlp)

        # Per-layer constants, kept as data (plain floats: no parameters, nothing to load).
        self.shortcut_scale = config.deepnorm_alpha
        self.in_scale = 1 / math.sqrt(layer + 1) if config.norm is NormScheme.LNS else 1.0
        self.norm_gain_init = 1 / math.sqrt(layer + 1) if config.norm is NormScheme.LNS_GAIN else 1.0

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = self.hook_resid_pre(x)  # (B, T, hidden)
        attn_in = _scaled(self.attn_norm(x), self.in_scale)
        branch = self.hook_attn_out(self.attn_branch_norm(self.attn(attn_in, cos, sin)))
        shortcut = self.hook_attn_shortcut(_scaled(self.attn_shortcut_gate(x), self.shortcut_scale))
        h = self.hook_resid_mid(self.attn_out_gate(self.attn_out_norm(shortcut + branch)))
        branch = self.hook_mlp_out(self.mlp_branch_norm(self.mlp(_scaled(self.mlp_norm(h), self.in_scale))))
        shortcut = self.hook_mlp_shortcut(_scaled(self.mlp_shortcut_gate(h), self.shortcut_scale))
        return self.hook_resid_post(self.mlp_out_gate(self.mlp_out_norm(shortcut + branch)))

    def gates(self) -> list[GPAS]:
        """This layer's distinct GPAS modules (one when shared, two per sub-layer, none without)."""
        seen: list[GPAS] = []
        for m in (self.attn_out_gate, self.attn_shortcut_gate, self.mlp_out_gate, self.mlp_shortcut_gate):
            if isinstance(m, GPAS) and all(m is not s for s in seen):
                seen.append(m)
        return seen
