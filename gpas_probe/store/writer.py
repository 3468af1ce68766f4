"""Writing the probe table: rows buffered column by column, flushed as parquet chunks, each written
atomically (:mod:`gpas_probe.atomic`); and trimming a resumed run's table back to its checkpoint."""

from __future__ import annotations

import json
import logging
import platform
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from gpas_probe._version import __version__
from gpas_probe.atomic import write_atomic, write_text_atomic
from gpas_probe.store.reader import load_run
from gpas_probe.store.schema import (
    ARROW_SCHEMA,
    META_FILE,
    META_KEY,
    SCHEMA_VERSION,
    empty_frame,
    part_files,
    part_number,
)

log = logging.getLogger(__name__)


class RowBuffer:
    """Rows kept column by column (plain lists), turned into an Arrow table in one go."""

    def __init__(self) -> None:
        self.step: list[int] = []
        self.layer: list[int] = []
        self.site: list[str] = []
        self.direction: list[str] = []
        self.stat: list[str] = []
        self.value: list[float] = []

    def add(self, step: int, layer: int, site: str, direction: str, stat: str, value: float) -> None:
        self.step.append(step)
        self.layer.append(layer)
        self.site.append(site)
        self.direction.append(direction)
        self.stat.append(stat)
        self.value.append(value)

    def __len__(self) -> int:
        return len(self.step)

    def clear(self) -> None:
        for col in (self.step, self.layer, self.site, self.direction, self.stat, self.value):
            col.clear()

    def to_table(self, run_id: str, metadata: dict[str, Any] | None = None) -> pa.Table:
        arrays = [pa.array([run_id] * len(self), pa.string()), pa.array(self.step, pa.int64()),
                  pa.array(self.layer, pa.int16()), pa.array(self.site, pa.string()),
                  pa.array(self.direction, pa.string()), pa.array(self.stat, pa.string()),
                  pa.array(self.value, pa.float64())]
        schema = ARROW_SCHEMA
        if metadata is not None:
            schema = schema.with_metadata({META_KEY: json.dumps(metadata, default=str).encode()})
        return pa.Table.from_arrays(arrays, schema=schema)


def git_revision(cwd: str | Path | None = None) -> str | None:
    """The commit checked out in ``cwd`` (default: the working directory), or None outside a repo."""
    try:
        res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    rev = res.stdout.strip()
    return rev if res.returncode == 0 and rev else None


def run_metadata(run_id: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The metadata stored with a run's probes: ``extra`` (the caller's configs) plus versions."""
    import torch  # here, not at the top: reading a run never imports torch

    own = {
        "schema_version": SCHEMA_VERSION,
        "run_id": run_id,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "gpas_probe_version": __version__,
        "torch_version": torch.__version__,
        "pyarrow_version": pa.__version__,
        "python_version": platform.python_version(),
        "git_revision": git_revision(),
        "columns": {f.name: str(f.type) for f in ARROW_SCHEMA},
    }
    clash = sorted(set(extra or {}) & set(own))
    if clash:
        log.warning("probe metadata keys %s are reserved and were replaced", clash)
    return {**(extra or {}), **own}


class ProbeWriter:
    """Buffers rows and writes them as parquet chunks in ``directory`` (a run's ``probes/``).

    A chunk is written every ``flush_rows`` rows, every ``flush_steps`` recorded steps (steps with only
    model rows do not count) or ``flush_seconds`` after the previous one, whichever comes first, and on
    :meth:`flush`/:meth:`close`: memory stays bounded and a live run's rows can be read. Chunks already
    in the directory (a resumed run) are kept and numbering continues after them; the metadata file is
    written once, when the directory is new.
    """

    def __init__(self, directory: str | Path, run_id: str, meta: dict[str, Any] | None = None, *,
                 flush_rows: int = 100_000, flush_steps: int = 50, flush_seconds: float = 30.0) -> None:
        if flush_rows <= 0 or flush_steps <= 0 or flush_seconds <= 0:
            raise ValueError(f"flush_rows, flush_steps and flush_seconds must be positive, got {flush_rows}, "
                             f"{flush_steps}, {flush_seconds}")
        self.directory = Path(directory)
        self.run_id = run_id
        self.flush_rows, self.flush_steps, self.flush_seconds = flush_rows, flush_steps, flush_seconds
        self._flushed = time.monotonic()
        self.meta = run_metadata(run_id, meta)
        self.directory.mkdir(parents=True, exist_ok=True)
        existing = part_files(self.directory)
        self._next = part_number(existing[-1]) + 1 if existing else 0
        if existing:
            log.info("%s: appending after %d existing probe chunks", self.directory, len(existing))
        meta_path = self.directory / META_FILE
        if not meta_path.exists():
            write_text_atomic(meta_path, json.dumps(self.meta, indent=2, default=str) + "\n")
        self._rows = RowBuffer()
        self._steps = 0
        self.closed = False

    def add(self, step: int, layer: int, site: str, direction: str, stat: str, value: float) -> None:
        self._rows.add(step, layer, site, direction, stat, value)

    def end_step(self, recorded: bool = True) -> None:
        """Marks the end of one step (``recorded``: the probes recorded it, rather than only its model
        rows); writes a chunk when a threshold is reached."""
        self._steps += recorded
        if len(self._rows) >= self.flush_rows or self._steps >= self.flush_steps \
                or time.monotonic() - self._flushed >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        if not len(self._rows):
            return
        table = self._rows.to_table(self.run_id, self.meta)
        path = self.directory / f"part-{self._next:06d}.parquet"
        write_atomic(path, lambda tmp: pq.write_table(table, tmp))
        log.debug("wrote %s (%d rows)", path, table.num_rows)
        self._next += 1
        self._rows.clear()
        self._steps = 0
        self._flushed = time.monotonic()

    def close(self) -> None:
        if not self.closed:
            self.flush()
            self.closed = True

    @property
    def buffered_rows(self) -> int:
        """Rows held in memory, not yet written: after :meth:`end_step` fewer than ``flush_rows``, and
        during a step fewer than ``flush_rows`` plus that step's rows (chunks end at step boundaries)."""
        return len(self._rows)

    @property
    def parts(self) -> list[Path]:
        return part_files(self.directory)

    def frame(self) -> pd.DataFrame:
        """Everything written so far (flushes first)."""
        self.flush()
        return load_run(self.directory)


class NullWriter:
    """Discards rows (the ranks of a distributed run that do not write)."""

    def add(self, *row: Any) -> None:
        pass

    def end_step(self, recorded: bool = True) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def frame(self) -> pd.DataFrame:
        return empty_frame()


class MemoryWriter:
    """The in-memory counterpart of :class:`ProbeWriter` (a probe without an output directory)."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self._rows = RowBuffer()
        self.closed = False

    def add(self, step: int, layer: int, site: str, direction: str, stat: str, value: float) -> None:
        self._rows.add(step, layer, site, direction, stat, value)

    def end_step(self, recorded: bool = True) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def frame(self) -> pd.DataFrame:
        return self._rows.to_table(self.run_id).to_pandas()


IF_EXISTS = ("error", "append", "overwrite")


def open_probe_folder(directory: str | Path, if_exists: str) -> bool:
    """Make ``directory`` (a run's ``probes/``) ready for a new writer. A folder that holds probe rows is
    refused (``if_exists="error"``), kept for rows to be added (``"append"``: returns True, and the caller
    trims the rows of the steps it records again with :func:`truncate_after`), or emptied
    (``"overwrite"``). Returns whether rows already there are kept."""
    if if_exists not in IF_EXISTS:
        raise ValueError(f"unknown if_exists {if_exists!r}; choose one of {', '.join(IF_EXISTS)}")
    d = Path(directory)
    parts = part_files(d) if d.is_dir() else []
    if not parts and not (d / META_FILE).exists():
        return False
    if if_exists == "error":
        raise FileExistsError(f"{d.parent} already holds probe rows ({len(parts)} chunk(s)); pass "
                              "if_exists='append' to add to them (steps recorded again replace theirs) or "
                              "'overwrite' to replace them")
    if if_exists == "overwrite":
        for f in [*parts, d / META_FILE, *d.glob(".*.tmp")]:
            f.unlink(missing_ok=True)
        return False
    return True


def truncate_after(directory: str | Path, step: int, *, check_only: bool = False) -> list[Path]:
    """Make a resumed run's probe table end at ``step`` (the checkpoint it resumes from): rows of
    later steps, recorded before the run stopped, are dropped so that the resumed run's rows replace
    them instead of sitting beside them. Each affected chunk is rewritten atomically (or removed when
    nothing is left), and temporary files of an interrupted write are removed, so a run killed
    meanwhile can be resumed again. Every chunk is read first: a corrupted one raises ``ValueError``
    before anything changes. ``check_only`` reads without changing anything. Returns the affected
    chunks."""
    d = Path(directory)
    if not d.is_dir():
        return []
    affected = []
    for f in part_files(d):
        try:
            steps = pq.read_table(f, columns=["step"]).column("step")
        except (pa.ArrowException, OSError, KeyError) as e:
            raise ValueError(f"{f}: corrupted or unreadable probe chunk ({e}); move it out of the run to resume") from e
        if len(steps) and pc.max(steps).as_py() > step:
            affected.append(f)
    if check_only:
        return affected
    for tmp in d.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
    for f in affected:
        table = pq.read_table(f)
        kept = table.filter(pc.less_equal(table.column("step"), step))
        if kept.num_rows:
            write_atomic(f, lambda tmp, kept=kept: pq.write_table(kept, tmp))
        else:
            f.unlink()
        log.info("%s: dropped %d rows after step %d", f, table.num_rows - kept.num_rows, step)
    return affected


