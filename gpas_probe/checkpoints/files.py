"""Reading a checkpoint folder's files: ``config.json``, the weights in every format we accept, and its
own tokenizer. A GGUF checkpoint (:mod:`gpas_probe.hf.gguf`) has its configuration and tokenizer read
from the file.

Weights come from ``model.safetensors``, a sharded ``model.safetensors.index.json``, or
``pytorch_model.bin`` (single or sharded, read with ``weights_only=True``). Every unreadable file is
reported the same way: ``PATH: unreadable weights (REASON)``.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpas_probe.errors import first_line
from gpas_probe.hf.gguf import gguf_config, gguf_file, gguf_tokenizer
from gpas_probe.jsonfile import read_object

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
SAFE_NAME, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN_NAME, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
#: A checkpoint's own tokenizer (read by :mod:`gpas_probe.evaldata`).
TOKENIZER_FILE = "tokenizer.json"
#: The file our own checkpoints hold their weights in.
WEIGHTS_NAME = SAFE_NAME


def read_config(path: str | Path) -> dict[str, Any]:
    """The ``config.json`` of checkpoint folder ``path`` (of a GGUF checkpoint: the configuration
    transformers reads from the file, :func:`gpas_probe.hf.gguf.gguf_config`)."""
    gguf = gguf_file(path)
    if gguf is not None:
        return gguf_config(gguf)
    p = Path(path) / CONFIG_NAME
    try:
        return read_object(p, "a model configuration")
    except FileNotFoundError:
        raise FileNotFoundError(f"{p.parent}: missing {CONFIG_NAME}") from None


def own_tokenizer(path: str | Path) -> Path | None:
    """A checkpoint's own tokenizer as a ``tokenizer.json`` file: its folder's, or the one a GGUF file holds
    (:func:`gpas_probe.hf.gguf.gguf_tokenizer`); None when it has none."""
    p = Path(path)
    if (p / TOKENIZER_FILE).is_file():
        return p / TOKENIZER_FILE
    gguf = gguf_file(p)
    return gguf_tokenizer(gguf) if gguf is not None else None


def _unreadable(f: Path, e: BaseException) -> ValueError:
    return ValueError(f"{f}: unreadable weights ({first_line(e)})")


def _load_safetensors(f: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file  # torch, imported where weights are read (module doc)

    try:
        return load_file(f)
    except (SafetensorError, OSError, ValueError) as e:
        raise _unreadable(f, e) from None


def _load_bin(f: Path) -> dict[str, torch.Tensor]:
    import torch

    try:
        state = torch.load(f, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError, ValueError) as e:
        raise _unreadable(f, e) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{f}: not a state dict of tensors")
    return state


def _load_sharded(index: Path, load: Callable[[Path], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    weight_map = read_object(index, "a shard index").get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index}: not a valid shard index (no weight_map of tensor names to files)")
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        f = index.parent / shard
        if not f.is_file():
            raise FileNotFoundError(f"{index.parent}: missing weights file {shard}")
        state.update(load(f))
    missing = sorted(k for k in weight_map if k not in state)
    if missing:
        raise ValueError(f"{index}: {len(missing)} tensors listed in the index are absent from their shards, "
                         f"e.g. {missing[:3]}")
    return state


def read_weights(ckpt_dir: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint folder, by HF key, on the CPU in their stored dtype.

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
        raise FileNotFoundError(f"{d}: no weights found: missing {SAFE_NAME} (also looked for {SAFE_INDEX}, "
                                f"{BIN_NAME} and {BIN_INDEX})")
    buffers = [k for k in state if k.endswith("rotary_emb.inv_freq")]
    for k in buffers:
        del state[k]
    if buffers:
        log.debug("%s: ignored %d rotary inv_freq buffers", d, len(buffers))
    return state


def stored_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    """The floating dtype the weights are stored in (the embedding's, else the first float tensor's)."""
    import torch

    t = state.get("model.embed_tokens.weight")
    if t is None:
        t = next((v for v in state.values() if v.is_floating_point()), None)
    return t.dtype if t is not None and t.is_floating_point() else torch.float32
