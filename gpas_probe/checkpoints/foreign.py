"""Checkpoints we did not write (DESIGN §5): the GPAS paper code's and Hugging Face LLaMA, Mistral, Qwen2,
loaded into our model. The scheme comes from the weight keys (:mod:`~gpas_probe.checkpoints.scheme`),
the rest from the Hugging Face ``config.json``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from gpas_probe.checkpoints.files import read_config, read_weights, stored_dtype
from gpas_probe.checkpoints.layout import assign_weights, parameter_map
from gpas_probe.checkpoints.native import empty_model
from gpas_probe.checkpoints.scheme import gate_granularity, infer_scheme, layer_parts
from gpas_probe.config import GateGranularity, ModelConfig, NormScheme
from gpas_probe.extras import install_hint
from gpas_probe.model import Transformer

log = logging.getLogger(__name__)

#: model_type -> the causal-LM class it is saved under; these load without transformers.
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
HF_EXTRA_HINT = ("other Hugging Face causal LMs load through transformers (gpas-probe profile falls back to it, "
                 f"gpas_probe.hf.load_hf_causal_lm), which needs the hf extra: {install_hint('hf')}")


def architecture(cfg: dict[str, Any]) -> str | None:
    """The natively supported model_type of an HF ``config.json``, or None when it is another one."""
    model_type = cfg.get("model_type")
    archs = [str(a) for a in cfg.get("architectures") or []]
    if model_type is None and archs:
        by_class = {cls.lower(): mt for mt, cls in ARCHITECTURES.items()}
        model_type = by_class.get(archs[0].lower())
    if model_type not in ARCHITECTURES:
        return None
    wanted = ARCHITECTURES[model_type].lower()
    if any(a.lower() != wanted for a in archs):
        return None
    return model_type


def _require(cfg: dict[str, Any], name: str) -> Any:
    if cfg.get(name) is None:
        raise ValueError(f"config.json lacks {name!r}")
    return cfg[name]


def _rope(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, Llama-3 scaling block or None) from the old top-level fields or v5 ``rope_parameters``."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or params
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return float(theta), None
    if kind != "llama3":
        raise ValueError(f"config.json: rope scaling rope_type={kind!r} is not supported (supported: default, llama3)")
    fields = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    lacking = [f for f in fields if f not in scaling]
    if lacking:
        raise ValueError(f"config.json: llama3 rope scaling lacks {lacking}")
    return float(theta), {"rope_type": "llama3", **{f: scaling[f] for f in fields}}


def _warn_sliding_window(cfg: dict[str, Any], model_type: str, max_len: int) -> None:
    window = cfg.get("sliding_window")
    if model_type == "qwen2":
        sliding = cfg.get("use_sliding_window") or "sliding_attention" in (cfg.get("layer_types") or [])
        window = window if sliding else None
    if window is not None and window < max_len:
        log.warning("%s sliding_window=%d is ignored: attention is full, so outputs differ from the original "
                    "for sequences longer than %d tokens", model_type, window, window)


def config_from_hf(cfg: dict[str, Any], keys: Iterable[str], norm: str | NormScheme | None = None,
                   post_layers: int | None = None) -> ModelConfig:
    """Our :class:`ModelConfig` for an HF ``config.json`` (LLaMA, Mistral, Qwen2) and the checkpoint's keys.

    The scheme and GPAS come from the keys (see :func:`infer_scheme`). Unsupported settings raise a
    ``ValueError`` naming the field.
    """
    model_type = architecture(cfg)
    if model_type is None:
        name = (cfg.get("architectures") or [cfg.get("model_type")])[0]
        raise ValueError(f"architecture {name!r} is not supported natively (supported: "
                         f"{', '.join(ARCHITECTURES.values())}); {HF_EXTRA_HINT}")
    if cfg.get("quantization_config"):
        raise ValueError("config.json: quantized checkpoints (quantization_config) are not supported")
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"config.json: hidden_act={act!r} is not supported (the MLP is SwiGLU: silu)")
    if cfg.get("mlp_bias"):
        raise ValueError("config.json: mlp_bias=true is not supported (the MLP has no biases)")
    if model_type != "qwen2" and cfg.get("attention_bias"):
        raise ValueError("config.json: attention_bias=true is not supported (it adds a bias to o_proj, "
                         "which this model lacks)")
    keys = list(keys)
    num_layers = int(_require(cfg, "num_hidden_layers"))
    scheme, n_post, _ = infer_scheme(keys, num_layers, norm, post_layers)
    gran = gate_granularity(layer_parts(keys, num_layers))
    theta, scaling = _rope(cfg)
    max_len = cfg.get("max_position_embeddings") or cfg.get("max_sequence_length") or 2048
    _warn_sliding_window(cfg, model_type, max_len)
    tie = cfg.get("tie_word_embeddings")
    if tie is None:  # hand-written configs: an absent lm_head means a tied one
        tie = "lm_head.weight" not in keys
    return ModelConfig(
        vocab_size=int(_require(cfg, "vocab_size")),
        hidden_size=int(_require(cfg, "hidden_size")),
        intermediate_size=int(_require(cfg, "intermediate_size")),
        num_layers=num_layers,
        num_heads=int(_require(cfg, "num_attention_heads")),
        num_kv_heads=cfg.get("num_key_value_heads"),
        head_dim=cfg.get("head_dim"),
        max_seq_len=int(max_len),
        rope_theta=theta,
        rope_scaling=scaling,
        rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        qkv_bias=model_type == "qwen2",
        tie_embeddings=bool(tie),
        norm=scheme,
        post_layers=n_post,
        gpas=gran is not None,
        gpas_granularity=gran or GateGranularity.LAYER,
        init_std=float(cfg.get("initializer_range", 0.02)),
    )


@torch.no_grad()
def load_foreign(ckpt_dir: str | Path, cfg: dict[str, Any] | None = None, norm: str | NormScheme | None = None,
                 post_layers: int | None = None, dtype: torch.dtype | None = None,
                 device: str | torch.device | None = None) -> Transformer:
    """Load an HF-layout checkpoint that has no ``gpas_probe`` block into a model in eval mode.

    ``cfg`` is the parsed ``config.json`` (read from ``ckpt_dir`` when None); ``dtype`` defaults to
    the stored one.
    """
    ckpt = Path(ckpt_dir)
    cfg = read_config(ckpt) if cfg is None else cfg
    state = read_weights(ckpt)
    try:
        config = config_from_hf(cfg, state.keys(), norm, post_layers)
    except ValueError as e:
        raise ValueError(f"{ckpt}: {e}") from None
    model = empty_model(config, dtype or stored_dtype(state), "meta")

    params = parameter_map(model)
    ignored = {"lm_head.weight"} if config.tie_embeddings else set()
    unexpected = sorted(set(state) - set(params) - ignored)
    if unexpected:
        raise ValueError(f"{ckpt}: weights the config does not account for, e.g. {unexpected[:3]} "
                         f"({len(unexpected)} in all)")
    assign_weights(model, state, str(ckpt))
    log.info("loaded %s: %s, norm=%s%s, %d layers", ckpt, architecture(cfg), config.norm,
             " + GPAS" if config.gpas else "", config.num_layers)
    return model.to(device=device or "cpu").eval()
