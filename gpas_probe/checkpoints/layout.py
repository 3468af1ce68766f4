"""The Hugging Face LLaMA layout of our weights (DESIGN §5): which key each parameter is saved under,
and the ``config.json`` our checkpoints carry.

Norm slots map to HF names per layer family; the GPAS gate uses the paper code's key
``model.layers.{l}.gpas_block.gate`` (per-sub-layer gates: ``gpas_attn.gate`` / ``gpas_mlp.gate``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gpas_probe.config import Family, GateGranularity, ModelConfig
from gpas_probe.model import Block, Transformer

FORMAT_VERSION = 1

#: Which HF key each filled norm slot is saved under, per layer family.
NORM_KEYS: dict[Family, dict[str, str]] = {
    Family.PRE: {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"},
    Family.SANDWICH: {
        "attn_norm": "input_layernorm", "attn_branch_norm": "post_attention_layernorm",
        "mlp_norm": "pre_feedforward_layernorm", "mlp_branch_norm": "post_feedforward_layernorm",
    },
    Family.POST: {"attn_out_norm": "post_attention_layernorm", "mlp_out_norm": "post_feedforward_layernorm"},
}
#: The module names of each layer's GPAS gates in the keys, by granularity.
GATE_NAMES = {GateGranularity.LAYER: ("gpas_block",), GateGranularity.SUBLAYER: ("gpas_attn", "gpas_mlp")}
_PROJ = {"self_attn": ("attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
         "mlp": ("mlp", ("gate_proj", "up_proj", "down_proj"))}


def _block_params(block: Block, gran: GateGranularity) -> dict[str, nn.Parameter]:
    out: dict[str, nn.Parameter] = {}
    for hf_mod, (ours, projs) in _PROJ.items():
        for proj in projs:
            lin = getattr(getattr(block, ours), proj)
            out[f"{hf_mod}.{proj}.weight"] = lin.weight
            if lin.bias is not None:
                out[f"{hf_mod}.{proj}.bias"] = lin.bias
    for slot, key in NORM_KEYS[block.family].items():
        out[f"{key}.weight"] = getattr(block, slot).weight
    gates = block.gates()
    for name, gate in zip(GATE_NAMES[gran][: len(gates)], gates, strict=True):
        out[f"{name}.gate"] = gate.alpha
    return out


def parameter_map(model: Transformer) -> dict[str, nn.Parameter]:
    """HF key -> the model's parameter object (shared tensors appear once)."""
    cfg = model.config
    out: dict[str, nn.Parameter] = {"model.embed_tokens.weight": model.embed_tokens.weight}
    for i, block in enumerate(model.layers):
        for k, p in _block_params(block, cfg.gpas_granularity).items():
            out[f"model.layers.{i}.{k}"] = p
    out["model.norm.weight"] = model.norm.weight
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = model.lm_head.weight
    return out


def hf_config(config: ModelConfig, step: int | None = None) -> dict[str, Any]:
    """``config.json`` content: LlamaConfig fields plus our ``gpas_probe`` block."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.rms_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": config.rope_scaling,
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": config.qkv_bias,
        "mlp_bias": False,
        "hidden_act": "silu",
        "initializer_range": config.init_std,
        "torch_dtype": "float32",
        "gpas_probe": {"format_version": FORMAT_VERSION, "step": step, "model_config": config.to_dict()},
    }


@torch.no_grad()
def assign_weights(model: Transformer, state: dict[str, torch.Tensor], where: str = "") -> None:
    """Copy HF-keyed tensors into ``model``; every expected key must be present with its shape, and
    no other weight may be left over (only rotary ``inv_freq`` buffers and a tied ``lm_head`` are skipped).

    A parameter still on the meta device (a model built by
    :func:`~gpas_probe.checkpoints.native.empty_model` with ``device="meta"``) takes the tensor itself
    (cast to its dtype) instead of a copy, so loading holds the weights once, not twice."""
    params = parameter_map(model)
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((module, name))
    missing = sorted(set(params) - set(state))
    if missing:
        raise ValueError(f"{where}: missing weights, e.g. {missing[:3]} ({len(missing)} in all)")
    skip = {"lm_head.weight"} if model.config.tie_embeddings else set()
    unexpected = sorted(k for k in set(state) - set(params) - skip if not k.endswith("rotary_emb.inv_freq"))
    if unexpected:
        raise ValueError(f"{where}: weights this model has no place for, e.g. {unexpected[:3]} "
                         f"({len(unexpected)} in all); check the scheme, GPAS and bias settings")
    for key, p in params.items():
        t = state[key]
        if t.numel() == p.numel() == 1:
            t = t.reshape(p.shape)
        if t.shape != p.shape:
            raise ValueError(f"{where}: {key} has shape {tuple(t.shape)}, the config implies {tuple(p.shape)}")
        if p.is_meta:
            adopted = nn.Parameter(t.to(p.dtype), requires_grad=p.requires_grad)
            for module, name in owners[id(p)]:  # a tied head shares the embedding's
                module._parameters[name] = adopted
        else:
            p.copy_(t)
