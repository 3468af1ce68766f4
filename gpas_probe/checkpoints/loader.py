"""Loading any checkpoint we can read: ours, other codebases' into our model, or others' with transformers."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gpas_probe.checkpoints.files import read_config
from gpas_probe.checkpoints.foreign import architecture, load_foreign
from gpas_probe.checkpoints.native import is_native, load_native
from gpas_probe.checkpoints.steps import checkpoint_step, resolve_checkpoint, step_checkpoints, step_from_name
from gpas_probe.config import BACKENDS
from gpas_probe.devices import resolve_dtype
from gpas_probe.hf.gguf import gguf_file, load_gguf_causal_lm
from gpas_probe.hf.loading import load_hf_causal_lm

log = logging.getLogger(__name__)



@dataclass
class Loaded:
    """A loaded checkpoint: the model in eval mode, the training step it records (None when it does not
    say), the checkpoint folder, its ``config.json`` and the backend that loaded it."""

    model: nn.Module
    step: int | None
    path: Path
    config: dict[str, Any] = field(repr=False)
    backend: str


def _uses_hf(cfg: dict[str, Any], backend: str) -> bool:
    if backend != "auto":
        return backend == "hf"
    if is_native(cfg) or architecture(cfg) is not None:
        return False
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False  # the native loader's error names the extra
    return True


def load(path: str | Path, *, backend: str = "native", norm: str | None = None,
                    post_layers: int | None = None, dtype: torch.dtype | str | None = None,
                    device: str | torch.device | None = None) -> Loaded:
    """Load a checkpoint folder (a run folder: its latest checkpoint) as a :class:`Loaded`: the model,
    its training step and where it came from.

    Our checkpoints carry their configuration. Others (the GPAS code's, Hugging Face LLaMA, Mistral,
    Qwen2) load natively by :mod:`~gpas_probe.checkpoints.foreign`, which infers the scheme from the
    keys; ``norm`` and ``post_layers`` override it where the keys cannot decide (post vs deepnorm).
    Other architectures load with transformers (``backend="hf"``, or ``"auto"``; see :data:`BACKENDS`),
    and so do GGUF files (a ``.gguf`` file, or a folder holding one; :mod:`gpas_probe.hf.gguf`), dequantised.
    ``dtype`` defaults to the stored one (ours: float32).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    ckpt = resolve_checkpoint(path)
    gguf = gguf_file(ckpt)
    if gguf is not None and backend == "native":
        raise ValueError(f"{gguf}: a GGUF file loads only with transformers (backend 'hf' or 'auto'), not natively")
    cfg = read_config(ckpt)
    dtype = resolve_dtype(dtype)
    if gguf is None and not _uses_hf(cfg, backend):
        if is_native(cfg):
            model: nn.Module = load_native(ckpt, cfg, norm=norm, dtype=dtype, device=device)
        else:
            model = load_foreign(ckpt, cfg, norm=norm, post_layers=post_layers, dtype=dtype, device=device)
        return Loaded(model, checkpoint_step(ckpt, cfg), ckpt, cfg, "native")
    given = [k for k, v in (("norm", norm), ("post_layers", post_layers)) if v is not None]
    if given:
        raise ValueError(f"{ckpt}: {', '.join(given)} applies only to checkpoints loaded natively, "
                         f"not with transformers")
    if gguf is not None:
        return Loaded(load_gguf_causal_lm(gguf, dtype=dtype, device=device), checkpoint_step(ckpt, cfg), ckpt, cfg,
                      "hf")
    try:
        model = load_hf_causal_lm(ckpt, dtype=dtype, device=device)
    except ValueError as e:
        if backend == "hf":
            raise
        name = (cfg.get("architectures") or [cfg.get("model_type")])[0]
        reason = str(e).removeprefix(f"{ckpt}: ")
        raise ValueError(f"{ckpt}: architecture {name!r} is not supported natively, and {reason}") from None
    return Loaded(model, checkpoint_step(ckpt, cfg), ckpt, cfg, "hf")


def load_checkpoint(path: str | Path, norm: str | None = None, post_layers: int | None = None,
                    dtype: torch.dtype | str | None = None, device: str | torch.device | None = None) -> nn.Module:
    """The model alone, loaded natively (:func:`load`; ``gpas_probe.load_checkpoint``), in eval mode."""
    return load(path, norm=norm, post_layers=post_layers, dtype=dtype, device=device).model


def step_loaders(folder: str | Path, **kwargs: Any) -> list[tuple[int, Any]]:
    """``(step, loader)`` for each step checkpoint of a run folder (or a folder of step checkpoints),
    oldest first: the input of :func:`gpas_probe.analysis.importance_over_training`. Nothing is loaded
    until a loader is called (it returns the model; ``kwargs`` go to :func:`load_checkpoint`)."""
    p = Path(folder)
    if not p.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {p}")
    found = step_checkpoints(p)
    if not found:
        raise FileNotFoundError(f"{p}: no step_* checkpoints here or under {p / 'checkpoints'}")
    return [(step_from_name(d) or 0, lambda d=d: load_checkpoint(d, **kwargs)) for d in found]
