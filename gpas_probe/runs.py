"""Run folders: ``run.json`` (configs, versions), ``checkpoints/step_NNNNNN/`` and ``probes/``.

A new run gets a fresh folder; a resumed run's model and arithmetic must match the ones it was started
with (:data:`ARITHMETIC`). Resuming restores the latest checkpoint's weights and trainer state, clears
what interrupted writes left behind and drops probe rows recorded after that checkpoint (see
:mod:`gpas_probe.training`); with no checkpoint it is refused.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from gpas_probe._version import __version__
from gpas_probe.atomic import remove_temporaries, temporary_file, write_text_atomic
from gpas_probe.checkpoints import assign_weights, read_weights, step_checkpoints
from gpas_probe.checkpoints.steps import CHECKPOINTS_DIR, step_dir_name, step_from_name
from gpas_probe.config import ModelConfig, TrainConfig
from gpas_probe.folders import RUN_META, read_run_meta
from gpas_probe.lock import RunLock, clear_folder
from gpas_probe.model import Transformer
from gpas_probe.store import PROBES_DIR, truncate_after
from gpas_probe.store.schema import part_files

log = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.pt"


def run_meta(model_config: ModelConfig, train_config: TrainConfig, extra: dict[str, Any]) -> dict[str, Any]:
    """The content of ``run.json``."""
    return {"gpas_probe_version": __version__, "torch_version": torch.__version__,
            "model_config": model_config.to_dict(), "train_config": train_config.to_dict(), **extra}


def checkpoint_path(run_dir: Path, step: int) -> Path:
    """Where a run's checkpoint of ``step`` goes."""
    return run_dir / CHECKPOINTS_DIR / step_dir_name(step)


#: TrainConfig fields that change what training computes: a resumed run must keep them. The others
#: (steps, evaluation, checkpoints, device, compile) may change on resume.
ARITHMETIC = ("lr", "warmup", "min_lr_ratio", "batch_size", "seq_len", "seed", "weight_decay", "betas", "grad_clip",
              "gate_clip", "data")


def _differences(old: dict[str, Any], new: dict[str, Any], keys: Any) -> list[str]:
    return sorted(k for k in keys if old.get(k) != new.get(k))


def check_resumable(out: Path, old: dict[str, Any], meta: dict[str, Any]) -> None:
    """Refuse to resume the run of ``old`` (its ``run.json``) with a model, arithmetic or process count
    of ``meta`` that differs."""
    meta = json.loads(json.dumps(meta))  # compare as stored (tuples become lists)
    diff = _differences(old["model_config"], meta["model_config"], meta["model_config"].keys())
    if diff:
        raise ValueError(f"{out}: --resume with a model configuration that differs from the run's: {diff}")
    diff = _differences(old["train_config"], meta["train_config"], ARITHMETIC)
    if diff:
        shown = ", ".join(f"{k} (run: {old['train_config'].get(k)!r}, now: {meta['train_config'].get(k)!r})"
                          for k in diff)
        raise ValueError(f"{out}: --resume with training settings that differ from the run's: {shown}")
    was, now = old.get("world_size", 1), meta.get("world_size", 1)
    if was != now:
        raise ValueError(f"{out}: --resume on {now} process(es), but the run was trained on {was} "
                         "(the global batch would change)")


def prepare_run_dir(out: Path, meta: dict[str, Any], resume: bool, overwrite: bool) -> dict[str, Any] | None:
    """Set up ``out`` for a new run, or check that a resumed run may continue; returns the resumed
    run's ``run.json`` (None for a new run). The caller holds the folder's lock (:mod:`gpas_probe.lock`).

    A folder holding a run (``run.json``) is refused unless ``resume`` (see :func:`check_resumable`) or
    ``overwrite`` (the folder is emptied). ``resume`` needs a run to continue. Nothing is written on refusal.
    """
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other: continue the run, or replace it")
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} is a file, not a run folder")
    meta_path = out / RUN_META
    if meta_path.exists():
        if resume:
            old = read_run_meta(meta_path)
            check_resumable(out, old, meta)
            return old
        if not overwrite:
            raise FileExistsError(f"{out} already holds a run; pass --overwrite to replace it or --resume")
        clear_folder(out)
    elif resume:
        raise FileNotFoundError(f"{out}: no run to resume (no {RUN_META}); leave out --resume to start one")
    elif any((out / d).exists() for d in ("checkpoints", PROBES_DIR)):  # left by a set-up that never finished
        if not overwrite:
            raise FileExistsError(f"{out} holds checkpoints or probes but no {RUN_META}; pass --overwrite to "
                                  "replace them")
        clear_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(meta_path, json.dumps(meta, indent=2) + "\n")
    return None


@dataclass
class Resumed:
    """Where a resumed run continues: its checkpoint, the step it holds, and the length of the run's
    learning-rate schedule (fixed when the run started: a longer ``steps`` extends the run at the
    schedule's final rate, it does not stretch the cosine)."""

    checkpoint: str
    step: int
    schedule_steps: int


def prepare(run_dir: Path, meta: dict[str, Any], resume: bool, overwrite: bool) -> Resumed | None:
    """Rank 0, holding the folder's lock: set up the run folder; on resume, check the probe chunks and
    find the checkpoint, or refuse when there is none."""
    old = prepare_run_dir(run_dir, meta, resume, overwrite)
    if old is None:
        return None
    truncate_after(run_dir / PROBES_DIR, 0, check_only=True)  # a corrupted chunk stops the resume here
    ckpts = step_checkpoints(run_dir)
    if not ckpts:
        raise FileNotFoundError(f"{run_dir}: nothing to resume from: the run stopped before its first checkpoint; "
                                "pass --overwrite to start it again")
    step = step_from_name(ckpts[-1]) or 0
    was = old["train_config"]
    return Resumed(str(ckpts[-1]), step, int(was.get("schedule_steps") or was["steps"]))


def record_resume(run_dir: Path, meta: dict[str, Any], step: int) -> None:
    """Rank 0, once the checkpoint has loaded: ``run.json`` takes the resumed settings (``steps``,
    ``schedule_steps``, evaluation, device, probes ...) and notes the resume."""
    old = read_run_meta(run_dir / RUN_META)
    new = {**old, "train_config": meta["train_config"], "probe_config": meta.get("probe_config"),
           "resumes": [*old.get("resumes", []), {"from_step": step, "steps": meta["train_config"]["steps"],
                                                 "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}]}
    write_text_atomic(run_dir / RUN_META, json.dumps(new, indent=2, default=str) + "\n")


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


@dataclass
class OpenedRun:
    """A run folder set up for writing (rank 0): its held lock, and where a resumed run continues (None
    for a new run)."""

    lock: RunLock
    resumed: Resumed | None


def open_run(run_dir: Path, meta: dict[str, Any], resume: bool, overwrite: bool) -> OpenedRun:
    """Rank 0: lock ``run_dir`` and :func:`prepare` it. On refusal the lock is released and a folder this
    call created goes with it (a refused new run leaves no folder). The caller announces the lock
    (:meth:`~gpas_probe.lock.RunLock.announce`) once the run is sure to start."""
    lock = RunLock(run_dir, "train").acquire()
    try:
        return OpenedRun(lock, prepare(run_dir, meta, resume, overwrite))
    except BaseException:
        lock.release()
        raise


def discard_run(run_dir: Path) -> None:
    """A new run failed (its lock still held): if it wrote neither a checkpoint nor a probe row (it failed
    to start: out of memory in its first step, an unwritable folder), remove what it wrote, so that
    nothing half-made stays; otherwise it is kept, to be resumed or read."""
    probes = run_dir / PROBES_DIR
    if step_checkpoints(run_dir) or (probes.is_dir() and part_files(probes)):
        return
    log.info("%s: removing the run that failed before its first checkpoint", run_dir)
    clear_folder(run_dir)
