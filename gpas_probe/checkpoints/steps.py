"""The one rule for finding checkpoints by training step.

A *step checkpoint* is a checkpoint folder (it holds ``config.json``) named ``step_N``, ``step-N``,
``checkpoint_N`` or ``checkpoint-N`` (ours are ``step_000120``; the Hugging Face ``Trainer`` writes
``checkpoint-120``). A run folder keeps them in ``checkpoints/``; any other folder may hold them
directly. The training step a checkpoint records (:func:`checkpoint_step`) comes from its files.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from gpas_probe.checkpoints.files import CONFIG_NAME, read_config
from gpas_probe.hf.gguf import gguf_file
from gpas_probe.jsonfile import read_object

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
_STEP_NAME = re.compile(r"(?:step|checkpoint)[_-](\d+)$")


def step_from_name(path: str | Path) -> int | None:
    """The step in a step checkpoint's folder name (``step_000120`` -> 120), or None."""
    m = _STEP_NAME.search(Path(path).name)
    return int(m.group(1)) if m else None


def step_dir_name(step: int) -> str:
    """The folder name of our checkpoint of ``step`` (``step_000120``)."""
    return f"step_{step:06d}"


def _step_dirs(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    found = [d for d in folder.iterdir()
             if d.is_dir() and step_from_name(d) is not None and (d / CONFIG_NAME).is_file()]
    return sorted(found, key=lambda d: step_from_name(d) or 0)


def step_checkpoints(folder: str | Path) -> list[Path]:
    """The step checkpoints of a run folder (in its ``checkpoints/``) or of a folder holding them, oldest first."""
    p = Path(folder)
    return _step_dirs(p / CHECKPOINTS_DIR) or _step_dirs(p)


def run_of(ckpt: Path) -> Path:
    """The folder a checkpoint belongs to: its run for a step checkpoint, else the checkpoint itself (a
    GGUF file's path without ``.gguf``, so that the run is named after the file)."""
    if step_from_name(ckpt) is None:
        return ckpt.with_suffix("") if ckpt.is_file() and gguf_file(ckpt) is not None else ckpt
    return ckpt.parent.parent if ckpt.parent.name == CHECKPOINTS_DIR else ckpt.parent


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder; a run folder (or a folder of step checkpoints) resolves to its latest. A GGUF
    checkpoint (a GGUF file, or a folder holding one and no ``config.json``) is itself."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    if (p / CONFIG_NAME).is_file():
        return p
    found = step_checkpoints(p)
    if found:
        return found[-1]
    if gguf_file(p) is not None:
        return p
    raise FileNotFoundError(f"{p}: no {CONFIG_NAME} here (and no checkpoints/step_* of a run, nor a .gguf file)")


def checkpoint_step(ckpt_dir: str | Path, cfg: dict[str, Any] | None = None) -> int | None:
    """The training step a checkpoint folder records, or None: our ``config.json`` block's, a top-level
    ``step``, the GPAS paper code's ``training_state.json`` or the HF ``Trainer``'s ``trainer_state.json``.
    ``cfg`` is the parsed ``config.json`` (read when None)."""
    ckpt = Path(ckpt_dir)
    cfg = read_config(ckpt) if cfg is None else cfg
    ours = cfg.get("gpas_probe")
    if isinstance(ours, dict):
        return ours.get("step")
    if cfg.get("step") is not None:
        return int(cfg["step"])
    for name, fields in (("training_state.json", ("update_step", "global_step")),
                         ("trainer_state.json", ("global_step",))):
        f = ckpt / name
        if not f.is_file():
            continue
        try:
            state = read_object(f, "a training state")
        except ValueError as e:
            log.warning("%s; step unknown", e)
            continue
        for field in fields:
            if isinstance(state.get(field), int):
                return state[field]
    return None
