"""LLaMA-style decoder with every normalization scheme of the paper, with and without GPAS."""

from gpas_probe.model.block import SITES, Block, ProbedLayer
from gpas_probe.model.layers import MLP, Attention, HookPoint, RMSNorm, Rotary
from gpas_probe.model.transformer import IGNORE_INDEX, ModelOutput, Transformer, build_model

__all__ = [
    "IGNORE_INDEX", "MLP", "SITES", "Attention", "Block", "HookPoint", "ModelOutput", "ProbedLayer", "RMSNorm",
    "Rotary", "Transformer", "build_model",
]
