"""Checkpoints in the Hugging Face LLaMA layout (DESIGN §5): ``config.json`` + ``model.safetensors``.

``config.json`` holds the ``LlamaConfig`` fields plus a ``gpas_probe`` block (scheme, GPAS settings,
step). Norm slots map to HF names per layer family; the GPAS gate uses the paper code's key
``model.layers.{l}.gpas_block.gate`` (per-sub-layer gates: ``gpas_attn.gate`` / ``gpas_mlp.gate``).
Saving is atomic: a checkpoint directory appears whole or not at all.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from gpas_probe.config import Family, GateGranularity, ModelConfig
from gpas_probe.model import Block, Transformer, build_model

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"

#: Which HF key each filled norm slot is saved under, per layer family.
NORM_KEYS: dict[Family, dict[str, str]] = {
    Family.PRE: {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"},
    Family.SANDWICH: {
        "attn_norm": "input_layernorm", "attn_branch_norm": "post_attention_layernorm",
        "mlp_norm": "pre_feedforward_layernorm", "mlp_branch_norm": "post_feedforward_layernorm",
    },
    Family.POST: {"attn_out_norm": "post_attention_layernorm", "mlp_out_norm": "post_feedforward_layernorm"},
}
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
    names = ["gpas_block"] if gran is GateGranularity.LAYER else ["gpas_attn", "gpas_mlp"]
    for name, gate in zip(names[: len(gates)], gates, strict=True):
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


def _atomic_dir(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; a checkpoint gets ordinary folder permissions
    return tmp


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish_dir(tmp: Path, path: Path) -> None:
    """Move a finished temporary directory into place, replacing any older one whole."""
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def remove_temporaries(directory: str | Path) -> None:
    """Clear what an interrupted :func:`save_checkpoint` may leave in ``directory`` (a run's
    ``checkpoints/``): unfinished temporary folders are removed; a replaced checkpoint whose
    successor never arrived is put back."""
    d = Path(directory)
    if not d.is_dir():
        return
    for p in sorted(d.iterdir()):
        if not (p.is_dir() and p.name.startswith(".")):
            continue
        name, sep, _ = p.name[1:].partition(".old-")
        if sep and not (d / name).exists():
            os.replace(p, d / name)
        elif sep or ".tmp-" in p.name:
            shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(model: Transformer, path: str | Path, step: int | None = None,
                    extra_files: dict[str, Any] | None = None,
                    state: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (and ``extra_files``: name -> object saved with
    ``torch.save``) into directory ``path``, atomically. Returns the path.

    ``state`` (a full state dict keyed like ``model.named_parameters()``, e.g. gathered from an FSDP
    model) supplies the tensors instead of the model's own parameters, which may be shards.
    """
    path = Path(path)
    params = parameter_map(model)
    if state is not None:
        names = {id(p): n for n, p in model.named_parameters()}  # first name of shared ones
        missing = sorted(k for k, p in params.items() if names.get(id(p)) not in state)
        if missing:
            raise ValueError(f"the state dict to save lacks {missing[:3]} ({len(missing)} in all)")
        source = {k: state[names[id(p)]] for k, p in params.items()}
    else:
        source = dict(params)
    tmp = _atomic_dir(path)
    try:
        tensors = {k: t.detach().to("cpu", torch.float32).contiguous().clone() for k, t in source.items()}
        save_file(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(hf_config(model.config, step), indent=2) + "\n")
        for name, obj in (extra_files or {}).items():
            torch.save(obj, tmp / name)
        publish_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved checkpoint %s", path)
    return path


def find_checkpoints(run_dir: str | Path) -> list[Path]:
    """The step checkpoints of a training run, oldest first."""
    ckpts = Path(run_dir) / "checkpoints"
    if not ckpts.is_dir():
        return []
    return sorted(p for p in ckpts.iterdir() if p.is_dir() and p.name.startswith("step_")
                  and (p / CONFIG_NAME).is_file())


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory; a run directory resolves to its latest checkpoint."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    if (p / CONFIG_NAME).is_file():
        return p
    found = find_checkpoints(p)
    if found:
        return found[-1]
    raise FileNotFoundError(f"{p}: no {CONFIG_NAME} here (and no checkpoints/step_* of a run)")


def read_config(path: str | Path) -> dict[str, Any]:
    p = Path(path) / CONFIG_NAME
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{p.parent}: missing {CONFIG_NAME}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not valid JSON ({e})") from None


def load_state(path: Path) -> dict[str, torch.Tensor]:
    """Weights of a checkpoint directory (our single-file safetensors)."""
    f = path / WEIGHTS_NAME
    if not f.is_file():
        raise FileNotFoundError(f"{path}: missing {WEIGHTS_NAME}")
    try:
        return load_file(f)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{f}: unreadable weights ({e})") from None


@torch.no_grad()
def assign_weights(model: Transformer, state: dict[str, torch.Tensor], where: str = "") -> None:
    """Copy HF-keyed tensors into ``model``; every expected key must be present with its shape, and
    no other weight may be left over (only rotary ``inv_freq`` buffers and a tied ``lm_head`` are skipped)."""
    params = parameter_map(model)
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
        p.copy_(t)


def load_checkpoint(path: str | Path, norm: str | None = None, post_layers: int | None = None,
                    dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> Transformer:
    """Load a checkpoint (or a run folder's latest) into a ready model in eval mode.

    Our own checkpoints carry their configuration. Others (the GPAS code's, Hugging Face LLaMA,
    Mistral, Qwen2) are read by :mod:`gpas_probe.foreign`, which infers the scheme from the keys;
    ``norm`` and ``post_layers`` override it where the keys cannot decide (post vs deepnorm).
    ``model.step`` is the training step when known, else ``None``.
    """
    ckpt = resolve_checkpoint(path)
    cfg = read_config(ckpt)
    ours = cfg.get("gpas_probe")
    if not ours:
        from gpas_probe.foreign import load_foreign

        return load_foreign(ckpt, cfg, norm=norm, post_layers=post_layers, dtype=dtype, device=device)
    config = ModelConfig.from_dict(ours["model_config"])
    if norm is not None and str(norm) != config.norm.value:
        raise ValueError(f"{ckpt}: this checkpoint was trained as {config.norm.value!r}, not {str(norm)!r}")
    with torch.device("meta"):
        model = build_model(config)
    model = model.to_empty(device="cpu")
    if config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    assign_weights(model, load_state(ckpt), str(ckpt))
    model.step = ours.get("step")  # type: ignore[assignment]
    return model.to(device=device, dtype=dtype).eval()
