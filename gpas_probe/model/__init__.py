"""LLaMA-style decoder with every normalization scheme of the paper, with and without GPAS.

``hooks`` (what the probes see: hook points and the probed-layer protocol), ``layers`` (RMSNorm, RoPE,
attention, SwiGLU), ``block`` (one decoder layer, slots filled per scheme), ``init`` (the paper's
initialisation), ``transformer`` (the whole model).
"""

from gpas_probe.model.block import Block
from gpas_probe.model.hooks import SITES, HookPoint, ProbedLayer, probed_layers
from gpas_probe.model.layers import MLP, Attention, RMSNorm, Rotary
from gpas_probe.model.transformer import IGNORE_INDEX, ModelOutput, Transformer, build_model

__all__ = [
    "IGNORE_INDEX", "MLP", "SITES", "Attention", "Block", "HookPoint", "ModelOutput", "ProbedLayer", "RMSNorm",
    "Rotary", "Transformer", "build_model", "probed_layers",
]
