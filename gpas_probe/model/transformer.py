"""The LLaMA-style decoder: embeddings, a stack of ``Block``s, final RMSNorm, untied (or tied) head."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from gpas_probe.config import ModelConfig
from gpas_probe.model.block import Block
from gpas_probe.model.init import init_weights
from gpas_probe.model.layers import RMSNorm, Rotary

IGNORE_INDEX = -100


class ModelOutput(NamedTuple):
    logits: torch.Tensor  # (B, T, vocab)
    loss: torch.Tensor | None  # mean cross-entropy over labels != IGNORE_INDEX


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, layer) for layer in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = Rotary(config)
        init_weights(self, config, self.embed_tokens, self.lm_head)

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The residual stream after the last layer, before the final norm: (B, T, hidden)."""
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary(input_ids.shape[1], x.dtype)
        for block in self.layers:
            x = block(x, cos, sin)
        return x

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> ModelOutput:
        """``labels`` are the targets aligned with ``input_ids`` (already shifted by one, as the
        data loaders produce them); positions labelled ``-100`` are ignored."""
        logits = self.lm_head(self.norm(self.hidden_states(input_ids)))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
        return ModelOutput(logits, loss)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build_model(config: ModelConfig) -> Transformer:
    """A freshly initialised model (the paper's init, DESIGN §4)."""
    return Transformer(config)
