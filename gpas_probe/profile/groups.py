"""Which checkpoints go into which profile run folder (nothing is loaded here).

Checkpoints of one training run share a run folder, so the steps of that folder show importance over
training: a run folder (``checkpoints/step_*``) or a folder of step checkpoints gives all its steps (only
the latest with ``latest=True``), and step checkpoints given one by one join their run's folder.
``RUN_ID`` is the run folder's name (a lone checkpoint's own folder name), or ``run_id=`` for
everything given.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from gpas_probe.checkpoints import CONFIG_NAME, resolve_checkpoint, run_of, step_checkpoints, step_from_name
from gpas_probe.folders import RUN_META, read_run_meta

PROFILE_FILE = "profile.json"


def checkpoint_groups(paths: Sequence[str | Path], *, run_id: str | None = None,
                      latest: bool = False) -> dict[str, list[Path]]:
    """``run_id -> checkpoint folders`` (oldest first) for what was given (module doc)."""
    if not paths:
        raise ValueError("no checkpoints given")
    groups: dict[str, list[Path]] = {}
    where: dict[str, Path] = {}
    for given in paths:
        p = Path(given)
        if not p.exists():
            raise FileNotFoundError(f"checkpoint not found: {p}")
        if (p / CONFIG_NAME).is_file() or p.is_file():
            ckpts, run = [resolve_checkpoint(p)], run_of(p.resolve())  # a file: GGUF, else resolve's error
        else:
            ckpts, run = (step_checkpoints(p) if p.is_dir() else []), p.resolve()
            if not ckpts:
                ckpts = [resolve_checkpoint(p)]  # a folder holding a GGUF file; else its one-line error
            if latest:
                ckpts = ckpts[-1:]
        name = run_id or run.name
        if run_id is None and where.setdefault(name, run) != run:
            raise ValueError(f"{where[name]} and {run} would both be profiled as run {name!r}; profile them "
                             f"separately, each with its own --run-id")
        group = groups.setdefault(name, [])
        group.extend(c for c in (c.resolve() for c in ckpts) if c not in group)
    for group in groups.values():
        group.sort(key=lambda c: (step_from_name(c) is None, step_from_name(c) or 0))
    return groups


def check_run_id(name: str) -> None:
    """Refuse a run id that is not a plain folder name."""
    if not name or name in (".", "..") or "/" in name or os.sep in name:
        raise ValueError(f"invalid run id {name!r}: it names a folder under the output folder")


def check_destination(dest: Path, overwrite: bool) -> None:
    """Refuse to replace an existing folder unless ``overwrite`` and it is a profile."""
    if not dest.exists():
        return
    if not overwrite:
        raise FileExistsError(f"{dest} already exists; pass --overwrite to replace it")
    if not (dest / PROFILE_FILE).is_file():
        raise FileExistsError(f"{dest} exists and is not a profile folder (no {PROFILE_FILE}); refusing to replace it")


def trained_seq_len(ckpt: Path) -> int | None:
    """The sequence length the checkpoint's run was trained on, from its ``run.json`` (ours), or None."""
    meta = run_of(Path(ckpt).resolve()) / RUN_META
    if not meta.is_file():
        return None
    try:
        seq_len = read_run_meta(meta)["train_config"].get("seq_len")
    except ValueError:
        return None  # not one of ours: its length is unknown
    return int(seq_len) if isinstance(seq_len, int) and seq_len > 0 else None
