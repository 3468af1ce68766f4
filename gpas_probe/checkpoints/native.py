"""Our own checkpoints: ``config.json`` (``LlamaConfig`` fields plus a ``gpas_probe`` block) and
``model.safetensors`` in the Hugging Face LLaMA layout (:mod:`~gpas_probe.checkpoints.layout`).
Saving is atomic: a checkpoint folder appears whole or not at all."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from gpas_probe.atomic import publish_dir, temporary_dir
from gpas_probe.checkpoints.files import CONFIG_NAME, WEIGHTS_NAME, read_weights
from gpas_probe.checkpoints.layout import assign_weights, hf_config, parameter_map
from gpas_probe.config import ModelConfig
from gpas_probe.errors import first_line
from gpas_probe.model import Transformer, build_model

log = logging.getLogger(__name__)


def is_native(cfg: dict[str, Any]) -> bool:
    """Whether a parsed ``config.json`` is one of ours (it has the ``gpas_probe`` block)."""
    return bool(cfg.get("gpas_probe"))


def save_checkpoint(model: Transformer, path: str | Path, step: int | None = None,
                    extra_files: dict[str, Any] | None = None,
                    state: Mapping[str, torch.Tensor] | None = None, marks: tuple[str, ...] = ()) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (and ``extra_files``: name -> object saved with
    ``torch.save``; ``marks``: names of empty marker files) into folder ``path``, atomically. Returns the path.

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
    tmp = temporary_dir(path)
    try:
        tensors = {k: t.detach().to("cpu", torch.float32).contiguous().clone() for k, t in source.items()}
        try:
            save_file(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        except SafetensorError as e:  # a failed write (a full disk): an OSError like any other
            no_space = "No space left" in str(e)
            raise OSError(errno.ENOSPC if no_space else errno.EIO,
                          "No space left on device" if no_space else first_line(e), str(path)) from None
        (tmp / CONFIG_NAME).write_text(json.dumps(hf_config(model.config, step), indent=2) + "\n")
        # safetensors writes its file private (0600); give it the mode of every other file we write
        os.chmod(tmp / WEIGHTS_NAME, stat.S_IMODE((tmp / CONFIG_NAME).stat().st_mode))
        for name, obj in (extra_files or {}).items():
            torch.save(obj, tmp / name)
        for name in marks:
            (tmp / name).touch()
        publish_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved checkpoint %s", path)
    return path


def empty_model(config: ModelConfig, dtype: torch.dtype | None = None,
                device: str | torch.device = "cpu") -> Transformer:
    """A model of ``config`` with uninitialised weights (built on the meta device: no memory, no random
    init), to be filled by :func:`~gpas_probe.checkpoints.layout.assign_weights`. With ``device="meta"``
    the weights stay unallocated and filling adopts the loaded tensors (only the rotary tables are made)."""
    with torch.device("meta"):
        model = build_model(config)
    model = model.to(dtype=dtype)
    if torch.device(device).type == "meta":
        model.rotary.to_empty(device="cpu")
    else:
        model = model.to_empty(device=device)
    if config.tie_embeddings:  # conversions replace parameters one module at a time: tie again
        model.lm_head.weight = model.embed_tokens.weight
    return model


def load_native(ckpt: Path, cfg: dict[str, Any], norm: str | None = None, dtype: torch.dtype | None = None,
                device: str | torch.device | None = None) -> Transformer:
    """One of our checkpoints (``cfg`` its parsed ``config.json``) as a model in eval mode."""
    config = ModelConfig.from_dict(cfg["gpas_probe"]["model_config"])
    if norm is not None and str(norm) != config.norm.value:
        raise ValueError(f"{ckpt}: this checkpoint was trained as {config.norm.value!r}, not {str(norm)!r}")
    model = empty_model(config, device="meta")
    assign_weights(model, read_weights(ckpt), str(ckpt))
    return model.to(device=device, dtype=dtype).eval()
