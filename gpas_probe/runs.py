"""Run folders: ``run.json`` (configs, versions), ``checkpoints/step_NNNNNN/`` and ``probes/``.

A new run gets a fresh folder; a resumed run's configuration must match the one it was started with;
resuming restores the latest checkpoint's weights and trainer state, clears what interrupted writes
left behind and drops probe rows recorded after that checkpoint (see :mod:`gpas_probe.training`).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from gpas_probe._version import __version__
from gpas_probe.atomic import remove_temporaries, temporary_file, write_text_atomic
from gpas_probe.checkpoints import assign_weights, read_weights, step_checkpoints
from gpas_probe.checkpoints.steps import CHECKPOINTS_DIR, step_dir_name
from gpas_probe.config import ModelConfig, TrainConfig
from gpas_probe.model import Transformer
from gpas_probe.store import PROBES_DIR, truncate_after

log = logging.getLogger(__name__)

RUN_META = "run.json"
TRAINER_STATE = "trainer_state.pt"


def run_meta(model_config: ModelConfig, train_config: TrainConfig, extra: dict[str, Any]) -> dict[str, Any]:
    """The content of ``run.json``."""
    return {"gpas_probe_version": __version__, "torch_version": torch.__version__,
            "model_config": model_config.to_dict(), "train_config": train_config.to_dict(), **extra}


def read_run_meta(path: Path) -> dict[str, Any]:
    """A run's ``run.json`` (the file's path), checked to be one of ours."""
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable run metadata ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model_config"), dict) \
            or not isinstance(meta.get("train_config"), dict):
        raise ValueError(f"{path}: not a gpas-probe run (model_config/train_config missing)")
    return meta


def checkpoint_path(run_dir: Path, step: int) -> Path:
    """Where a run's checkpoint of ``step`` goes."""
    return run_dir / CHECKPOINTS_DIR / step_dir_name(step)


def prepare_run_dir(out: Path, meta: dict[str, Any], resume: bool, overwrite: bool) -> None:
    """Create ``out`` for a new run, or check that a resumed run's configuration matches.

    A folder holding a run (``run.json``) is refused unless ``resume`` (same configuration; only
    ``steps`` and ``device`` may change, and the number of processes may not) or ``overwrite``
    (the folder is replaced). ``resume`` needs a run to continue. Nothing is written on refusal.
    """
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other: continue the run, or replace it")
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} is a file, not a run folder")
    meta_path = out / RUN_META
    if meta_path.exists():
        if resume:
            old = read_run_meta(meta_path)
            meta = json.loads(json.dumps(meta))  # compare as stored (tuples become lists)
            if old.get("model_config") != meta["model_config"]:
                diff = sorted(k for k in meta["model_config"] if old["model_config"].get(k) != meta["model_config"][k])
                raise ValueError(f"{out}: --resume with a model configuration that differs from the run's: {diff}")
            keep = {k: v for k, v in old["train_config"].items() if k not in ("steps", "device")}
            new = {k: v for k, v in meta["train_config"].items() if k not in ("steps", "device")}
            if keep != new:
                diff = sorted(k for k in keep.keys() | new.keys() if keep.get(k) != new.get(k))
                raise ValueError(f"{out}: --resume with training settings that differ from the run's: {diff}")
            was, now = old.get("world_size", 1), meta.get("world_size", 1)
            if was != now:
                raise ValueError(f"{out}: --resume on {now} process(es), but the run was trained on {was} "
                                 "(the global batch would change)")
            return
        if not overwrite:
            raise FileExistsError(f"{out} already holds a run; pass --overwrite to replace it or --resume")
        shutil.rmtree(out)
    elif resume:
        raise FileNotFoundError(f"{out}: no run to resume (no {RUN_META}); leave out --resume to start one")
    elif any((out / d).exists() for d in ("checkpoints", PROBES_DIR)):  # left by a set-up that never finished
        if not overwrite:
            raise FileExistsError(f"{out} holds checkpoints or probes but no {RUN_META}; pass --overwrite to "
                                  "replace them")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(meta_path, json.dumps(meta, indent=2) + "\n")


def prepare(run_dir: Path, meta: dict[str, Any], resume: bool, overwrite: bool) -> str | None:
    """Rank 0: set up the run folder; on resume, check the probe chunks and find the checkpoint."""
    prepare_run_dir(run_dir, meta, resume, overwrite)
    if not resume:
        return None
    truncate_after(run_dir / PROBES_DIR, 0, check_only=True)  # a corrupted chunk stops the resume here
    ckpts = step_checkpoints(run_dir)
    return str(ckpts[-1]) if ckpts else None


def restore_weights(model: Transformer, ckpt: Path, device: torch.device) -> dict[str, Any]:
    """Load a checkpoint's weights into ``model`` (whole, before any sharding); returns its trainer state."""
    assign_weights(model, read_weights(ckpt), str(ckpt))
    path = ckpt / TRAINER_STATE
    if not path.is_file():
        raise FileNotFoundError(f"{ckpt}: missing {TRAINER_STATE}; this checkpoint cannot be resumed")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0].split(". ")[0]
        raise ValueError(f"{path}: unreadable trainer state ({reason})") from None
    if not isinstance(state, dict) or "step" not in state or "optimizer" not in state:
        raise ValueError(f"{path}: not a gpas-probe trainer state")
    return state


def tidy_resumed(run_dir: Path, step: int) -> None:
    """Rank 0, once the checkpoint has loaded: clear interrupted writes and drop probe rows after ``step``."""
    remove_temporaries(run_dir / CHECKPOINTS_DIR)
    temporary_file(run_dir / RUN_META).unlink(missing_ok=True)
    dropped = truncate_after(run_dir / PROBES_DIR, step)
    if dropped:
        log.info("%s: probe rows after step %d dropped from %d chunk(s)", run_dir, step, len(dropped))
