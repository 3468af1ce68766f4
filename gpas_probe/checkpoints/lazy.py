"""A checkpoint's safetensors tensors read on demand (for streamed profiles, :mod:`gpas_probe.profile.streamed`).

:class:`LazyWeights` reads only the files' headers when opened. :meth:`LazyWeights.read` reads a group of
tensors (one module's) from disk straight into one new buffer, cast to the dtype asked for: one large
allocation per group, returned whole to the system when the group is dropped, so reading the layers of
a large model one after another does not fragment the heap (many separate weight-sized allocations
would be kept by the C allocator and the process would grow with every layer read).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from pathlib import Path

import torch

from gpas_probe.jsonfile import read_object

SAFE_NAME, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _header(f: Path) -> tuple[dict[str, dict], int]:
    """The tensors of a safetensors file (name -> dtype, shape, data_offsets) and where their data begins."""
    try:
        with f.open("rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{f}: unreadable weights ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{f}: unreadable weights (no tensor table)")
    header.pop("__metadata__", None)
    return header, 8 + size


class LazyWeights:
    """The safetensors tensors of checkpoint folder ``ckpt`` (one file or shards with an index), by key."""

    def __init__(self, ckpt: Path) -> None:
        if (ckpt / SAFE_INDEX).is_file():
            weight_map = read_object(ckpt / SAFE_INDEX, "a shard index").get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{ckpt / SAFE_INDEX}: not a valid shard index (no weight_map)")
            files = sorted({ckpt / str(v) for v in weight_map.values()})
        elif (ckpt / SAFE_NAME).is_file():
            files = [ckpt / SAFE_NAME]
        else:
            raise ValueError(f"{ckpt}: streaming reads safetensors weights ({SAFE_NAME} or {SAFE_INDEX}); "
                             f"none here (profile it without --stream)")
        self.entries: dict[str, tuple[Path, torch.dtype, tuple[int, ...], int, int]] = {}
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"{ckpt}: missing weights file {f.name}")
            header, start = _header(f)
            for key, info in header.items():
                if key.endswith("rotary_emb.inv_freq"):
                    continue
                if info.get("dtype") not in DTYPES:
                    raise ValueError(f"{f}: tensor {key} is stored as {info.get('dtype')}, not a float type")
                begin, end = info["data_offsets"]
                self.entries[key] = (f, DTYPES[info["dtype"]], tuple(info["shape"]), start + begin, end - begin)

    def keys(self) -> list[str]:
        return list(self.entries)

    def dtype(self, key: str) -> torch.dtype:
        return self.entries[key][1]

    def read(self, keys: Sequence[str], dtype: torch.dtype, device: torch.device | str = "cpu") -> list[torch.Tensor]:
        """The tensors of ``keys`` in ``dtype``, views of one buffer (on ``device``)."""
        sizes = [torch.Size(self.entries[k][2]).numel() for k in keys]
        flat = torch.empty(sum(sizes), dtype=dtype)
        out, at = [], 0
        for key, n in zip(keys, sizes, strict=True):
            f, stored, shape, offset, nbytes = self.entries[key]
            view = flat[at:at + n]
            at += n
            target = view if stored == dtype else torch.empty(n, dtype=stored)
            with f.open("rb") as fh:
                fh.seek(offset)
                fh.readinto(memoryview(target.view(torch.uint8).numpy()))
            if target is not view:
                view.copy_(target)
            out.append(view.view(shape))
        if torch.device(device).type != "cpu":
            moved = flat.to(device)
            del flat
            out = [moved[o.storage_offset():o.storage_offset() + o.numel()].view(o.shape) for o in out]
        return out
