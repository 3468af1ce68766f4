"""GGUF files (llama.cpp, Ollama) as checkpoints, read by transformers' GGUF reader (the ``hf`` extra,
with the ``gguf`` package), dequantised to float.

A *GGUF checkpoint* is a GGUF file (``*.gguf``, or any file with the GGUF magic, as Ollama's blobs), or a
folder holding one ``*.gguf`` file and no ``config.json``. Its configuration is the one transformers builds
from the metadata; its tokenizer, written once as a ``tokenizer.json`` under ``$XDG_CACHE_HOME/gpas-probe/gguf``
(default ``~/.cache``), is used like a checkpoint folder's own. Which architectures and quantisation types
load depends on the installed transformers and gguf.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from gpas_probe.atomic import write_text_atomic
from gpas_probe.errors import first_line
from gpas_probe.extras import require
from gpas_probe.hf.loading import load_hf_causal_lm, quiet, require_transformers

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

GGUF_SUFFIX, GGUF_MAGIC = ".gguf", b"GGUF"


def require_gguf() -> ModuleType:
    """The ``gguf`` module, or an ``ImportError`` that names the extra to install."""
    return require("gguf", "hf", "to read GGUF files")


def gguf_file(path: str | Path) -> Path | None:
    """The GGUF file a checkpoint path means (module doc), or None when it is not a GGUF checkpoint;
    a folder holding several ``.gguf`` files is an error that names them."""
    p = Path(path)
    if p.is_file():
        with p.open("rb") as f:
            return p if p.suffix == GGUF_SUFFIX or f.read(4) == GGUF_MAGIC else None
    if not p.is_dir() or (p / "config.json").is_file():
        return None
    found = sorted(f for f in p.iterdir() if f.suffix == GGUF_SUFFIX and f.is_file())
    if len(found) > 1:
        raise ValueError(f"{p}: {len(found)} GGUF files here ({', '.join(f.name for f in found)}); "
                         f"give the one to load, e.g. {found[0]}")
    return found[0] if found else None


class GGUFInfo(NamedTuple):
    """What a GGUF file declares: its architecture, the storage types of its tensors (``F32``, ``Q8_0``...)
    and the size of its vocabulary (0 when it holds no tokenizer)."""

    architecture: str
    tensor_types: tuple[str, ...]
    tokens: int


def _stamp(file: Path) -> tuple[str, int, int]:
    """A file's cache key (path, size, mtime), once the gguf package is known to import."""
    require_gguf()
    st = file.stat()
    return str(file.resolve()), st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=8)
def _info(key: tuple[str, int, int]) -> GGUFInfo:  # errors are not cached: raised again on every call
    gguf, file = require_gguf(), key[0]
    try:
        reader = gguf.GGUFReader(file)
    except (ValueError, OSError, KeyError, IndexError) as e:
        if "GGMLQuantizationType" in str(e):  # a type id this gguf does not know
            raise ValueError(f"{file}: unsupported quantisation type ({first_line(e)}; gguf "
                             f"{getattr(gguf, '__version__', '')} does not know it)") from None
        raise ValueError(f"{file}: not a readable GGUF file ({first_line(e)})") from None
    arch, tokens = reader.fields.get("general.architecture"), reader.fields.get("tokenizer.ggml.tokens")
    if arch is None:
        raise ValueError(f"{file}: not a model GGUF file (no general.architecture in its metadata)")
    types = sorted({t.tensor_type for t in reader.tensors})
    bad = []
    for t in types:  # what the gguf package cannot dequantise, transformers cannot load
        try:
            gguf.dequantize(np.zeros((1, gguf.GGML_QUANT_SIZES[t][1]), dtype=np.uint8), t)
        except NotImplementedError:
            bad.append(t.name)
    if bad:
        raise ValueError(f"{file}: unsupported quantisation type {', '.join(bad)} (gguf cannot dequantise it); "
                         f"supported are F32, F16, BF16 and the Q*/IQ* block types")
    return GGUFInfo(bytes(arch.parts[arch.data[0]]).decode(), tuple(t.name for t in types),
                    len(tokens.data) if tokens else 0)


def check_gguf(file: str | Path) -> GGUFInfo:
    """A GGUF file's header (:class:`GGUFInfo`); tensor types that gguf cannot dequantise are refused
    (gguf 0.19: I8-I64, F64, Q8_1, Q8_K, and any type newer than the package)."""
    return _info(_stamp(Path(file)))


@functools.lru_cache(maxsize=8)
def _config(key: tuple[str, int, int]) -> dict[str, Any]:
    file = Path(key[0])
    info = check_gguf(file)
    transformers = require_transformers()
    try:
        with quiet(transformers):
            config = transformers.AutoConfig.from_pretrained(str(file.parent), gguf_file=file.name,
                                                             local_files_only=True)
    except (ValueError, KeyError, OSError, TypeError, AttributeError, RuntimeError) as e:
        if isinstance(e, KeyError) or any(s in str(e) for s in ("not supported", "Unrecognized")):
            raise ValueError(f"{file}: the file declares architecture {info.architecture!r}, which transformers "
                             f"{transformers.__version__} cannot read from GGUF (unsupported architecture)") from None
        raise ValueError(f"{file}: transformers cannot read its configuration ({first_line(e)})") from None
    cfg = json.loads(json.dumps(config.to_dict(), default=str))
    cfg["gguf"] = {"file": file.name, "architecture": info.architecture, "tensor_types": list(info.tensor_types)}
    return cfg


def gguf_config(file: str | Path) -> dict[str, Any]:
    """The configuration transformers builds from a GGUF file's metadata, as a ``config.json`` dict, with a
    ``gguf`` block (the file, its architecture and tensor types)."""
    return copy.deepcopy(_config(_stamp(Path(file))))


@contextmanager
def _tensor_bar_off() -> Iterator[None]:
    """transformers' GGUF reader draws a tqdm bar of its own, outside its progress-bar switch: off here."""
    module = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    bar = getattr(module, "tqdm", None)
    module.tqdm = functools.partial(bar, disable=True) if bar is not None else None
    try:
        yield
    finally:
        module.tqdm = bar


def load_gguf_causal_lm(file: str | Path, dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None) -> nn.Module:
    """A GGUF file loaded with ``AutoModelForCausalLM``, every weight dequantised to float, in eval mode;
    ``dtype`` defaults to the one transformers picks (float32 for llama-family files)."""
    file = Path(file)
    gguf = gguf_config(file)["gguf"]  # its one-line errors, for the file and the architecture
    transformers = require_transformers()
    options: dict[str, Any] = {"gguf_file": file.name}
    if hasattr(transformers, "GgufConfig"):  # transformers >= 5.x may otherwise keep the blocks packed
        options["quantization_config"] = transformers.GgufConfig(dequantize=True)
    try:
        with _tensor_bar_off():
            model = load_hf_causal_lm(file.parent, dtype=dtype, device=device, **options)
    except ValueError as e:
        reason = str(e).removeprefix(f"{file.parent}: ")
        raise ValueError(f"{file}: GGUF architecture {gguf['architecture']!r}: {reason}") from None
    log.info("loaded %s (%s; %s) dequantised", file, gguf["architecture"], ", ".join(gguf["tensor_types"]))
    return model


def gguf_tokenizer(file: str | Path) -> Path | None:
    """The tokenizer a GGUF file holds, as a ``tokenizer.json`` written once to the cache (module doc), or
    None. Tokens transformers adds beyond the file's vocabulary (its byte-level builder adds
    ``<|endoftext|>``) are left out: the tokenizer must fit the model's embedding."""
    file, info = Path(file), check_gguf(file)
    gguf_config(file)  # its one-line error for an architecture transformers cannot read
    if info.tokens == 0:
        log.warning("%s holds no tokenizer", file)
        return None
    transformers = require_transformers()
    key = "\0".join(map(str, (*_stamp(file), transformers.__version__)))
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gpas-probe" / "gguf"
    out = cache / f"{file.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.tokenizer.json"
    if out.is_file():
        return out
    try:
        with quiet(transformers):
            tok = transformers.AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name,
                                                             local_files_only=True)
        spec = json.loads(tok.backend_tokenizer.to_str())
    except Exception as e:  # the converters raise many kinds; any of them means no tokenizer
        raise ValueError(f"{file}: transformers cannot build its tokenizer ({first_line(e)}); "
                         f"give a tokenizer.json") from None
    added = spec.get("added_tokens", [])
    spec["added_tokens"] = [t for t in added if t["id"] < info.tokens]
    log.debug("%s: tokens beyond its vocabulary left out: %s", file, [t for t in added if t["id"] >= info.tokens])
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps(spec, ensure_ascii=False))
    log.info("%s: its tokenizer written to %s", file, out)
    return out
