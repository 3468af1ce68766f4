"""The paper code's initialisation, applied by role rather than by parameter name (DESIGN §4)."""

from __future__ import annotations

import torch
from torch import nn

from gpas_probe.config import ModelConfig, NormScheme
from gpas_probe.gpas import GPAS
from gpas_probe.model.block import Block
from gpas_probe.model.layers import RMSNorm


@torch.no_grad()
def init_weights(model: nn.Module, config: ModelConfig, embed: nn.Embedding, lm_head: nn.Linear) -> None:
    """Linear weights N(0, init_std²), norms 1 (LNS-gain: ``1/sqrt(l+1)`` on the input norms), gates
    ``gpas_init``, the embedding N(0, embed_init_std²), an untied head N(0, init_std²), and DeepNorm's
    xavier gains."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=config.init_std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, RMSNorm):
            nn.init.ones_(m.weight)
        elif isinstance(m, GPAS):
            m.alpha.fill_(config.gpas_init)
    if not config.tie_embeddings:
        nn.init.normal_(lm_head.weight, std=config.init_std)
    nn.init.normal_(embed.weight, std=config.embed_init_std)
    for block in (m for m in model.modules() if isinstance(m, Block)):
        for norm in (block.attn_norm, block.mlp_norm):
            if isinstance(norm, RMSNorm):
                norm.weight.fill_(block.norm_gain_init)
        if config.norm is NormScheme.DEEPNORM:
            gain = (8 * config.num_layers) ** -0.25
            attn, mlp = block.attn, block.mlp
            for lin in (attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
                nn.init.xavier_normal_(lin.weight, gain=gain)
            for lin in (attn.q_proj, attn.k_proj):
                nn.init.xavier_normal_(lin.weight, gain=1.0)
