"""The paper code's initialisation, applied by role rather than by parameter name (DESIGN §4)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from gpas_probe.config import NormScheme
from gpas_probe.gpas import GPAS
from gpas_probe.model.layers import RMSNorm

if TYPE_CHECKING:
    from gpas_probe.model.transformer import Transformer


@torch.no_grad()
def init_weights(model: Transformer) -> None:
    cfg = model.config
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=cfg.init_std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, RMSNorm):
            nn.init.ones_(m.weight)
        elif isinstance(m, GPAS):
            m.alpha.fill_(cfg.gpas_init)
    if not cfg.tie_embeddings:
        nn.init.normal_(model.lm_head.weight, std=cfg.init_std)
    nn.init.normal_(model.embed_tokens.weight, std=cfg.embed_init_std)
    for block in model.layers:
        for norm in (block.attn_norm, block.mlp_norm):
            if isinstance(norm, RMSNorm):
                norm.weight.fill_(block.norm_gain_init)
        if cfg.norm is NormScheme.DEEPNORM:
            gain = (8 * cfg.num_layers) ** -0.25
            attn, mlp = block.attn, block.mlp
            for lin in (attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
                nn.init.xavier_normal_(lin.weight, gain=gain)
            for lin in (attn.q_proj, attn.k_proj):
                nn.init.xavier_normal_(lin.weight, gain=1.0)
