"""Checkpoints we did not write (DESIGN §5): the GPAS paper code's and Hugging Face LLaMA, Mistral, Qwen2.

Weights come from ``model.safetensors``, a sharded ``model.safetensors.index.json``, or
``pytorch_model.bin`` (single or sharded, read with ``weights_only=True``). The paper's training code
saves the HF LLaMA layout with extra keys and records the normalization scheme nowhere, so the scheme
is read off the keys of each layer:

================  ==========================================================================
layer family      norm keys of ``model.layers.{l}``
================  ==========================================================================
pre               ``input_layernorm``, ``post_attention_layernorm``
sandwich          pre's two plus ``pre_feedforward_layernorm``, ``post_feedforward_layernorm``
post / deepnorm   ``post_attention_layernorm``, ``post_feedforward_layernorm``
================  ==========================================================================

``model.layers.{l}.gpas_block.gate`` marks GPAS; Mix-LN is post layers first, then pre layers. Post
and deepnorm differ only by a constant that is not stored, and LNS looks like pre: the caller says
which with ``norm=``, and any ``norm=``/``post_layers=`` given must agree with the keys.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from gpas_probe.checkpoint import NORM_KEYS, assign_weights, parameter_map, read_config
from gpas_probe.config import Family, GateGranularity, ModelConfig, NormScheme
from gpas_probe.model import Transformer, build_model
from gpas_probe.model.layers import rope_inv_freq

log = logging.getLogger(__name__)

SAFE_NAME, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN_NAME, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"

#: model_type -> the causal-LM class it is saved under; these load without transformers.
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
HF_EXTRA_HINT = ('other Hugging Face causal LMs load through transformers (gpas-probe profile falls back to it, '
                 'gpas_probe.hf.load_hf_causal_lm), which needs the hf extra: pip install "gpas-probe[hf]"')

_FAMILY_BY_NORMS = {frozenset(keys.values()): fam for fam, keys in NORM_KEYS.items()}
_GATE_NAMES = {GateGranularity.LAYER: frozenset({"gpas_block"}),
               GateGranularity.SUBLAYER: frozenset({"gpas_attn", "gpas_mlp"})}
_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)")
_NORM_KEY = re.compile(r"(\w+_layernorm)\.weight")
_GATE_KEY = re.compile(r"(gpas_\w+)\.gate")


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


# --------------------------------------------------------------------------------------- weights

def _load_safetensors(f: Path) -> dict[str, torch.Tensor]:
    if not f.is_file():
        raise FileNotFoundError(f"{f.parent}: missing weights file {f.name}")
    try:
        return load_file(f)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{f}: unreadable or truncated safetensors file ({_first_line(e)})") from None


def _load_bin(f: Path) -> dict[str, torch.Tensor]:
    if not f.is_file():
        raise FileNotFoundError(f"{f.parent}: missing weights file {f.name}")
    try:
        state = torch.load(f, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError, ValueError) as e:
        raise ValueError(f"{f}: unreadable or truncated PyTorch weights file ({_first_line(e)})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{f}: not a state dict of tensors")
    return state


def _load_sharded(index: Path, load: Any) -> dict[str, torch.Tensor]:
    try:
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{index}: not a valid shard index ({_first_line(e)})") from None
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        state.update(load(index.parent / shard))
    missing = sorted(k for k in weight_map if k not in state)
    if missing:
        raise ValueError(f"{index}: {len(missing)} tensors listed in the index are absent from their shards, "
                         f"e.g. {missing[:3]}")
    return state


def read_weights(ckpt_dir: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint directory, by HF key, on the CPU in their stored dtype.

    Looks for ``model.safetensors.index.json``, ``model.safetensors``, ``pytorch_model.bin.index.json``,
    ``pytorch_model.bin``, in that order. Rotary ``inv_freq`` buffers of older checkpoints are dropped.
    """
    d = Path(ckpt_dir)
    if (d / SAFE_INDEX).is_file():
        state = _load_sharded(d / SAFE_INDEX, _load_safetensors)
    elif (d / SAFE_NAME).is_file():
        state = _load_safetensors(d / SAFE_NAME)
    elif (d / BIN_INDEX).is_file():
        state = _load_sharded(d / BIN_INDEX, _load_bin)
    elif (d / BIN_NAME).is_file():
        state = _load_bin(d / BIN_NAME)
    else:
        raise FileNotFoundError(f"{d}: no weights found (looked for {SAFE_NAME}, {SAFE_INDEX}, {BIN_NAME}, "
                                f"{BIN_INDEX})")
    buffers = [k for k in state if k.endswith("rotary_emb.inv_freq")]
    for k in buffers:
        del state[k]
    if buffers:
        log.debug("%s: ignored %d rotary inv_freq buffers", d, len(buffers))
    return state


# --------------------------------------------------------------------------------- scheme inference

def _layer_parts(keys: Iterable[str], num_layers: int) -> list[tuple[frozenset[str], frozenset[str]]]:
    """Per layer: (norm names, gate module names) found among the keys."""
    norms: list[set[str]] = [set() for _ in range(num_layers)]
    gates: list[set[str]] = [set() for _ in range(num_layers)]
    seen: set[int] = set()
    for key in keys:
        m = _LAYER_KEY.fullmatch(key)
        if not m:
            continue
        layer, rest = int(m.group(1)), m.group(2)
        if layer >= num_layers:
            raise ValueError(f"weights for layer {layer} found, but the config has num_hidden_layers={num_layers}")
        seen.add(layer)
        if n := _NORM_KEY.fullmatch(rest):
            norms[layer].add(n.group(1))
        elif g := _GATE_KEY.fullmatch(rest):
            gates[layer].add(g.group(1))
    absent = sorted(set(range(num_layers)) - seen)
    if absent:
        raise ValueError(f"no weights for layer {absent[0]} (of num_hidden_layers={num_layers}); "
                         f"{len(absent)} layers are absent")
    return [(frozenset(n), frozenset(g)) for n, g in zip(norms, gates, strict=True)]


def _families(parts: list[tuple[frozenset[str], frozenset[str]]]) -> list[Family]:
    out = []
    for layer, (norms, _) in enumerate(parts):
        fam = _FAMILY_BY_NORMS.get(norms)
        if fam is None:
            raise ValueError(f"layer {layer} has norm weights {sorted(norms)}, which fit no scheme "
                             f"(pre, post, sandwich, deepnorm, mixln)")
        out.append(fam)
    return out


def _granularity(parts: list[tuple[frozenset[str], frozenset[str]]]) -> GateGranularity | None:
    """GPAS gate granularity shared by every layer, or None without GPAS."""
    kinds = set()
    for layer, (_, gates) in enumerate(parts):
        kind = next((g for g, names in _GATE_NAMES.items() if gates == names), None)
        if gates and kind is None:
            raise ValueError(f"layer {layer} has GPAS gates {sorted(gates)}; expected gpas_block.gate "
                             f"(or gpas_attn.gate + gpas_mlp.gate)")
        kinds.add(kind)
    if len(kinds) > 1:
        raise ValueError("some layers have a GPAS gate (gpas_block.gate) and others do not")
    return kinds.pop() if kinds else None


def _scheme_of(families: list[Family]) -> tuple[NormScheme | None, int | None]:
    """The scheme the families spell (None for all-post: post and deepnorm look alike)."""
    n_post = next((i for i, f in enumerate(families) if f is not Family.POST), len(families))
    if all(f is Family.SANDWICH for f in families):
        return NormScheme.SANDWICH, None
    if all(f is Family.PRE for f in families):
        return NormScheme.PRE, None
    if n_post == len(families):
        return None, None
    if n_post > 0 and all(f is Family.PRE for f in families[n_post:]):
        return NormScheme.MIXLN, n_post
    raise ValueError(f"the layers' norm keys spell the families {[f.value for f in families]}, which fit no "
                     f"scheme (Mix-LN is post layers first, then pre layers)")


def _parse_norm(norm: str | NormScheme) -> NormScheme:
    try:
        return NormScheme(norm)
    except ValueError:
        raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(s.value for s in NormScheme)}") from None


def infer_scheme(keys: Iterable[str], num_layers: int, norm: str | NormScheme | None = None,
                 post_layers: int | None = None) -> tuple[NormScheme, int | None, bool]:
    """(scheme, Mix-LN post layers or None, GPAS present) from a checkpoint's keys.

    ``norm``/``post_layers`` override what the keys suggest (``post_layers`` alone means Mix-LN) but
    must describe the same per-layer wiring. LNS checkpoints infer as pre; pass ``norm='lns'`` or
    ``'lns-gain'``. All-post checkpoints need ``norm='post'`` or ``'deepnorm'``.
    """
    parts = _layer_parts(keys, num_layers)
    families = _families(parts)
    gpas = _granularity(parts) is not None
    inferred, n_post = _scheme_of(families)
    if norm is None and post_layers is None:
        if inferred is None:
            raise ValueError("every layer is post-norm, which fits both post and deepnorm (DeepNorm's shortcut "
                             "multiplier is not stored in the weights); pass norm='post' or norm='deepnorm' "
                             "(CLI: --norm post|deepnorm)")
        return inferred, n_post, gpas

    scheme = NormScheme.MIXLN if norm is None else _parse_norm(norm)
    if post_layers is not None and scheme is not NormScheme.MIXLN:
        raise ValueError(f"post_layers applies only to norm='mixln', not norm='{scheme}'")
    if scheme is NormScheme.MIXLN and post_layers is None:
        post_layers = n_post if inferred is NormScheme.MIXLN else sum(f is Family.POST for f in families)
    expected = ModelConfig(num_layers=num_layers, norm=scheme, post_layers=post_layers)
    for layer, fam in enumerate(families):
        if expected.family(layer) is not fam:
            what = f"norm='{scheme}'" + (f", post_layers={post_layers}" if scheme is NormScheme.MIXLN else "")
            raise ValueError(f"{what} does not match the checkpoint: layer {layer} has "
                             f"{sorted(parts[layer][0])} (a {fam.value} layer), {what} implies a "
                             f"{expected.family(layer).value} layer")
    return scheme, (post_layers if scheme is NormScheme.MIXLN else None), gpas


# ----------------------------------------------------------------------------------------- config

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
    gran = _granularity(_layer_parts(keys, num_layers))
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


# ----------------------------------------------------------------------------------------- loading

def _step(ckpt: Path, cfg: dict[str, Any]) -> int | None:
    """Training step: config.json ``step``, the paper code's training_state.json, or HF's trainer_state.json."""
    if cfg.get("step") is not None:
        return int(cfg["step"])
    for name, fields in (("training_state.json", ("update_step", "global_step")),
                         ("trainer_state.json", ("global_step",))):
        f = ckpt / name
        if not f.is_file():
            continue
        try:
            state = json.loads(f.read_text())
        except json.JSONDecodeError:
            log.warning("%s: not valid JSON, step unknown", f)
            continue
        for field in fields:
            if isinstance(state.get(field), int):
                return state[field]
    return None


def checkpoint_step(ckpt_dir: str | Path, cfg: dict[str, Any] | None = None) -> int | None:
    """The training step a checkpoint folder records (config.json ``step``, the paper code's
    ``training_state.json``, HF's ``trainer_state.json``), or None."""
    ckpt = Path(ckpt_dir)
    return _step(ckpt, read_config(ckpt) if cfg is None else cfg)


def _stored_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    t = state.get("model.embed_tokens.weight")
    if t is None:
        t = next((v for v in state.values() if v.is_floating_point()), None)
    return t.dtype if t is not None and t.is_floating_point() else torch.float32


@torch.no_grad()
def load_foreign(ckpt_dir: str | Path, cfg: dict[str, Any] | None = None, norm: str | NormScheme | None = None,
                 post_layers: int | None = None, dtype: torch.dtype | None = None,
                 device: str | torch.device | None = None) -> Transformer:
    """Load an HF-layout checkpoint that has no ``gpas_probe`` block into a model in eval mode.

    ``cfg`` is the parsed ``config.json`` (read from ``ckpt_dir`` when None). ``dtype`` defaults to
    the stored one; ``model.step`` is the training step when the checkpoint records it, else None.
    """
    ckpt = Path(ckpt_dir)
    cfg = read_config(ckpt) if cfg is None else cfg
    state = read_weights(ckpt)
    try:
        config = config_from_hf(cfg, state.keys(), norm, post_layers)
    except ValueError as e:
        raise ValueError(f"{ckpt}: {e}") from None
    dtype = dtype or _stored_dtype(state)
    device = torch.device(device or "cpu")

    with torch.device("meta"):  # no memory, no random init: every tensor is overwritten below
        model = build_model(config)
    model = model.to(dtype=dtype).to_empty(device=device)
    if config.tie_embeddings:  # conversions replace parameters one module at a time: tie again
        model.lm_head.weight = model.embed_tokens.weight
    assert config.head_dim is not None
    model.rotary.inv_freq = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling).to(device)

    params = parameter_map(model)
    ignored = {"lm_head.weight"} if config.tie_embeddings else set()
    unexpected = sorted(set(state) - set(params) - ignored)
    if unexpected:
        raise ValueError(f"{ckpt}: weights the config does not account for, e.g. {unexpected[:3]} "
                         f"({len(unexpected)} in all)")
    assign_weights(model, state, str(ckpt))
    model.step = _step(ckpt, cfg)  # type: ignore[assignment]
    log.info("loaded %s: %s, norm=%s%s, %d layers", ckpt, architecture(cfg), config.norm,
             " + GPAS" if config.gpas else "", config.num_layers)
    return model.eval()
