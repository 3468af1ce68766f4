"""Run folders, read without importing torch (``info``, ``plot``, ``compare``, ``diagnose``): a run's
``run.json`` and what the run is doing, the runs an output root (``runs/``, ``profiles/``) holds, and
labels that tell apart runs whose folders share a name."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gpas_probe.checkpoints.steps import step_checkpoints, step_from_name
from gpas_probe.jsonfile import read_object
from gpas_probe.store import PROBES_DIR, read_meta, run_writer
from gpas_probe.store.schema import META_FILE, part_files

log = logging.getLogger(__name__)

RUN_META = "run.json"


def read_run_meta(path: Path) -> dict[str, Any]:
    """A run's ``run.json`` (the file's path), checked to be one of ours."""
    try:
        meta = read_object(path, "a run's metadata")
    except OSError as e:
        raise ValueError(f"{path}: unreadable run metadata ({e})") from None
    if not isinstance(meta.get("model_config"), dict) or not isinstance(meta.get("train_config"), dict):
        raise ValueError(f"{path}: not a gpas-probe run (model_config/train_config missing)")
    return meta


def run_home(path: str | Path) -> Path:
    """The run folder of a run path (its ``probes/`` folder or a chunk file given instead)."""
    path = Path(path)
    if path.is_file():
        path = path.parent
    return path.parent if path.name == PROBES_DIR else path


def run_state(path: str | Path) -> str:
    """What a run folder (or its ``probes/``) is doing: ``running (pid 123, train, since 12:00:01)``,
    ``finished at step 300``, ``stopped at step 120 of 300 ...`` or ``not being written``."""
    live = run_writer(path)
    if live:
        return f"running ({live['text']})"
    folder = run_home(path)
    if not (folder / RUN_META).is_file():
        return "not being written"
    steps = read_run_meta(folder / RUN_META)["train_config"].get("steps")
    ckpts = step_checkpoints(folder)
    last = step_from_name(ckpts[-1]) if ckpts else None
    if last is not None and steps is not None and last >= steps:
        return f"finished at step {last}"
    if last is not None:
        return f"stopped at step {last} of {steps} (its last checkpoint): continue with --resume"
    return "stopped before its first checkpoint: start it again with --overwrite"


def holds_probes(folder: Path) -> bool:
    """Whether ``folder`` is a run (a ``probes/`` folder, or probe chunks or metadata directly inside)."""
    if folder.is_file():
        return folder.suffix == ".parquet"
    probes = folder / PROBES_DIR if (folder / PROBES_DIR).is_dir() else folder
    return probes.is_dir() and ((probes / META_FILE).is_file() or bool(part_files(probes)))


def runs_in(folder: Path) -> list[Path]:
    """The runs directly inside ``folder`` (an output root such as ``runs/`` or ``profiles/``), by name."""
    if not folder.is_dir():
        return []
    return sorted(d for d in folder.iterdir() if d.is_dir() and d.name != PROBES_DIR and holds_probes(d))


def run_folders(paths: Sequence[str | Path]) -> list[Path]:
    """The runs that ``paths`` name: a run as it is; an output root holding one run, that run; an output
    root holding several, an error that lists them. Anything else is passed on for its reader's error."""
    found = []
    for path in map(Path, paths):
        inside = [] if not path.is_dir() or holds_probes(path) else runs_in(path)
        if len(inside) == 1:
            log.warning("%s holds one run: using %s", path, inside[0])
        elif len(inside) > 1:
            names = ", ".join(str(r) for r in inside)
            raise ValueError(f"{path} holds {len(inside)} runs, not one: {names}; name the run(s) to read")
        found.extend(inside or [path])
    return found


def run_labels(paths: Sequence[Path]) -> list[str]:
    """Each run's id (its probe metadata's ``run_id``, else its folder's name); where several runs share
    one, their shortest distinct path endings instead (``runs/a`` and ``profiles/a``)."""
    ids = []
    for path in paths:
        try:
            ids.append(str(read_meta(path).get("run_id") or run_home(path).name))
        except (OSError, ValueError):
            ids.append(run_home(path).name)  # its reader reports the problem
    shared = {i for i in ids if ids.count(i) > 1}
    if not shared:
        return ids
    clashing = [i for i, run_id in enumerate(ids) if run_id in shared]
    parts = [run_home(paths[i]).resolve().parts for i in clashing]
    ends = [ids[i] for i in clashing]
    for depth in range(2, max(map(len, parts)) + 1):
        ends = ["/".join(p[-depth:]) for p in parts]
        if len(set(ends)) == len(ends):
            break
    for i, end in zip(clashing, ends, strict=True):
        ids[i] = end
    if len(set(ids)) < len(ids):
        raise ValueError(f"the same run is given twice: {', '.join(sorted(shared))}")
    return ids

