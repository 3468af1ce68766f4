"""The probe table on disk (DESIGN §7): one long table per run, written as parquet chunks.

A run directory ``runs/x/`` gets::

    probes/_meta.json              run metadata (also in every chunk's parquet key-value metadata)
    probes/part-000000.parquet     chunks, each written under a hidden temporary name, then renamed
    probes/part-000001.parquet     ...

The metadata file starts with ``_`` so that parquet readers treat it as a side file:
``pandas.read_parquet("runs/x/probes")`` (or polars/DuckDB on ``probes/*.parquet``) reads the
chunks without gpas_probe installed. Columns and their types:

=========== ======== ===========================================================
column      type     meaning
=========== ======== ===========================================================
run_id      string   the run (default: the run directory's name)
step        int64    the optimizer step (1-based) the row describes
layer       int16    decoder layer (0-based); -1 for model-level rows
site        string   resid_pre, attn_out, ..., attn, mlp, params, gpas, model ...
direction   string   fwd (activation), bwd (gradient w.r.t. it) or none
stat        string   var, rms, absmax, shortcut_branch_ratio, grad_norm, loss ...
value       float64  the statistic (NaN and inf are kept as they are)
=========== ======== ===========================================================

:func:`load_run` returns exactly these columns; its string columns use pandas' default string dtype
(``str`` with pandas >= 3, ``object`` before).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import subprocess
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
PROBES_DIR = "probes"
META_FILE = "_meta.json"
META_KEY = b"gpas_probe"
COLUMNS = ("run_id", "step", "layer", "site", "direction", "stat", "value")
ARROW_SCHEMA = pa.schema([
    ("run_id", pa.string()), ("step", pa.int64()), ("layer", pa.int16()), ("site", pa.string()),
    ("direction", pa.string()), ("stat", pa.string()), ("value", pa.float64()),
])
STRING_COLUMNS = ("run_id", "site", "direction", "stat")
_LOAD_SCHEMA = pa.schema([pa.field(f.name, pa.large_string() if f.name in STRING_COLUMNS else f.type)
                          for f in ARROW_SCHEMA])
#: The key of one statistic; a resumed run may repeat it, and :func:`load_run` keeps the last.
KEY_COLUMNS = ["step", "layer", "site", "direction", "stat"]
_PART = re.compile(r"^part-(\d{6,})\.parquet$")


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
    import torch

    from gpas_probe import __version__

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


def _write_atomic(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _part_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if _PART.match(p.name))


class ProbeWriter:
    """Buffers rows and writes them as parquet chunks in ``directory`` (a run's ``probes/``).

    A chunk is written every ``flush_rows`` rows or every ``flush_steps`` recorded steps (steps with
    only model rows do not count), whichever comes first, and on :meth:`flush`/:meth:`close`, so
    memory stays bounded. Chunks already in the directory (a resumed run) are kept and numbering
    continues after them; the metadata file is written once, when the directory is new.
    """

    def __init__(self, directory: str | Path, run_id: str, meta: dict[str, Any] | None = None, *,
                 flush_rows: int = 100_000, flush_steps: int = 50) -> None:
        if flush_rows <= 0 or flush_steps <= 0:
            raise ValueError(f"flush_rows and flush_steps must be positive, got {flush_rows}, {flush_steps}")
        self.directory = Path(directory)
        self.run_id = run_id
        self.flush_rows, self.flush_steps = flush_rows, flush_steps
        self.meta = run_metadata(run_id, meta)
        self.directory.mkdir(parents=True, exist_ok=True)
        existing = _part_files(self.directory)
        self._next = int(_PART.match(existing[-1].name).group(1)) + 1 if existing else 0  # type: ignore[union-attr]
        if existing:
            log.info("%s: appending after %d existing probe chunks", self.directory, len(existing))
        meta_path = self.directory / META_FILE
        if not meta_path.exists():
            _write_atomic(meta_path, lambda tmp: tmp.write_text(json.dumps(self.meta, indent=2, default=str) + "\n"))
        self._rows = RowBuffer()
        self._steps = 0
        self.closed = False

    def add(self, step: int, layer: int, site: str, direction: str, stat: str, value: float) -> None:
        self._rows.add(step, layer, site, direction, stat, value)

    def end_step(self, recorded: bool = True) -> None:
        """Marks the end of one step (``recorded``: the probes recorded it, rather than only its model
        rows); writes a chunk when a threshold is reached."""
        self._steps += recorded
        if len(self._rows) >= self.flush_rows or self._steps >= self.flush_steps:
            self.flush()

    def flush(self) -> None:
        if not len(self._rows):
            return
        table = self._rows.to_table(self.run_id, self.meta)
        path = self.directory / f"part-{self._next:06d}.parquet"
        _write_atomic(path, lambda tmp: pq.write_table(table, tmp))
        log.debug("wrote %s (%d rows)", path, table.num_rows)
        self._next += 1
        self._rows.clear()
        self._steps = 0

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
        return _part_files(self.directory)

    def frame(self) -> pd.DataFrame:
        """Everything written so far (flushes first)."""
        self.flush()
        return load_run(self.directory)


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
    for f in _part_files(d):
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
            _write_atomic(f, lambda tmp, kept=kept: pq.write_table(kept, tmp))
        else:
            f.unlink()
        log.info("%s: dropped %d rows after step %d", f, table.num_rows - kept.num_rows, step)
    return affected


def _probes_dir(path: str | Path) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such run directory or probe file")
    if p.is_dir() and (p / PROBES_DIR).is_dir():
        return p / PROBES_DIR
    return p


def _read_chunk(path: Path) -> pa.Table:
    """One chunk with exactly the schema's columns: strings as ``large_string``, numbers cast.

    String columns are read dictionary-encoded (as parquet stores them) and decoded with one ``take``
    per column: several times faster than reading them as plain strings. ``large_string`` is what
    pandas' Arrow-backed string dtype holds, so the conversion to pandas copies no string data.
    """
    try:
        table = pq.read_table(path, read_dictionary=list(STRING_COLUMNS))
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: corrupted or unreadable probe chunk ({e})") from e
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"{path}: not a probe chunk, columns {missing} are missing")
    try:
        columns = [_as_large_string(table[f.name]) if f.name in STRING_COLUMNS else table[f.name].cast(f.type)
                   for f in ARROW_SCHEMA]
    except (pa.ArrowException, ValueError) as e:
        raise ValueError(f"{path}: probe chunk columns have unexpected types ({e})") from e
    return pa.Table.from_arrays(columns, schema=_LOAD_SCHEMA)


def _as_large_string(column: pa.ChunkedArray) -> pa.ChunkedArray:
    chunks = [pc.take(c.dictionary.cast(pa.large_string()), c.indices) if pa.types.is_dictionary(c.type)
              else c.cast(pa.large_string()) for c in column.chunks]
    return pa.chunked_array(chunks, pa.large_string())


def _superseded(steps: Sequence[np.ndarray]) -> np.ndarray | None:
    """Given each chunk's ``step`` column, the rows (of the chunks concatenated) whose step another
    chunk also records, or None when no two chunks share a step: the usual case, decided from the
    step ranges alone."""
    ranges = sorted((int(s.min()), int(s.max())) for s in steps if len(s))
    if all(lo > prev_hi for (_, prev_hi), (lo, _) in zip(ranges[:-1], ranges[1:], strict=True)):
        return None
    values, counts = np.unique(np.concatenate([np.unique(s) for s in steps]), return_counts=True)
    shared = values[counts > 1]
    return np.isin(np.concatenate(steps), shared) if len(shared) else None


def empty_frame() -> pd.DataFrame:
    """A probe table with no rows and the documented columns and dtypes."""
    return ARROW_SCHEMA.empty_table().to_pandas()


def load_run(path: str | Path, run_id: str | None = None, *, dedupe: bool = True) -> pd.DataFrame:
    """One run's probe table: ``path`` is the run directory, its ``probes/`` folder or one chunk.

    ``run_id`` replaces the stored run id. With ``dedupe``, a statistic that a later chunk records
    again for the same step (a run resumed from a checkpoint older than its last chunk) keeps its
    last value; only rows of steps that several chunks share are compared. The table goes to pandas
    column by column, each Arrow column released once converted, and string data is not copied.
    """
    p = _probes_dir(path)
    files = _part_files(p) if p.is_dir() else [p]
    if not files and not (p / META_FILE).exists():
        raise FileNotFoundError(f"{p}: no probe table here (no {PROBES_DIR}/ folder, chunks or {META_FILE})")
    if not files:
        frame = empty_frame()
    else:
        tables = [_read_chunk(f) for f in files]
        contested = _superseded([t["step"].to_numpy() for t in tables]) if dedupe and len(files) > 1 else None
        table = pa.concat_tables(tables)
        del tables
        if contested is not None:
            table = table.filter(pa.array(~_repeated_keys(table, contested)))
        columns = dict(zip(table.column_names, table.columns, strict=True))
        del table
        frame = pd.DataFrame({name: columns.pop(name).to_pandas() for name in list(columns)}, copy=False)
    if run_id is not None:
        frame["run_id"] = pd.Series([run_id] * len(frame), dtype=frame["run_id"].dtype, index=frame.index)
    return frame


def _repeated_keys(table: pa.Table, contested: np.ndarray) -> np.ndarray:
    """Rows of ``table`` among the ``contested`` ones whose key a later row repeats."""
    rows = np.flatnonzero(contested)
    keys = table.select(KEY_COLUMNS).take(pa.array(rows)).to_pandas()
    repeated = np.zeros(table.num_rows, dtype=bool)
    repeated[rows[keys.duplicated(KEY_COLUMNS, keep="last").to_numpy()]] = True
    return repeated


def load_runs(paths: Iterable[str | Path], run_ids: Sequence[str] | None = None, *,
              dedupe: bool = True) -> pd.DataFrame:
    """Several runs in one long table (see :func:`load_run`); ``run_ids`` replace the stored ids."""
    paths = list(paths)
    if run_ids is not None and len(run_ids) != len(paths):
        raise ValueError(f"got {len(run_ids)} run_ids for {len(paths)} runs")
    frames = [load_run(p, None if run_ids is None else run_ids[i], dedupe=dedupe) for i, p in enumerate(paths)]
    if not frames:
        return empty_frame()
    ids = [f["run_id"].iloc[0] for f in frames if len(f)]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ValueError(f"several runs share the run_id {dup}; pass run_ids= to tell them apart")
    return pd.concat(frames, ignore_index=True)


def read_meta(path: str | Path) -> dict[str, Any]:
    """A run's probe metadata, from ``_meta.json`` or, for a single chunk, its parquet metadata."""
    p = _probes_dir(path)
    if p.is_dir():
        meta_path = p / META_FILE
        if not meta_path.exists():
            raise FileNotFoundError(f"{meta_path}: no probe metadata")
        return json.loads(meta_path.read_text())
    kv = pq.read_schema(p).metadata or {}
    if META_KEY not in kv:
        raise ValueError(f"{p}: no gpas_probe metadata in this parquet file")
    return json.loads(kv[META_KEY])


def run_info(path: str | Path) -> dict[str, Any]:
    """A summary of a recorded run: steps, layers, sites, statistics, rows and bytes on disk."""
    p = _probes_dir(path)
    frame = load_run(p)
    files = _part_files(p) if p.is_dir() else [p]
    steps = sorted(frame["step"].unique().tolist())
    probed = sorted(frame.loc[frame["layer"] >= 0, "step"].unique().tolist())  # beyond the model rows
    layers = sorted(x for x in frame["layer"].unique().tolist() if x >= 0)
    size = sum(f.stat().st_size for f in files)
    return {
        "run_id": frame["run_id"].iloc[0] if len(frame) else p.parent.name,
        "steps": f"{len(probed)} recorded by the probes, {len(steps)} with rows"
        + (f", {steps[0]}..{steps[-1]}" if steps else ""),
        "layers": len(layers),
        "sites": ", ".join(sorted(frame["site"].unique().tolist())),
        "stats": ", ".join(sorted(frame["stat"].unique().tolist())),
        "rows": f"{len(frame):,}",
        "size": f"{size:,} bytes in {len(files)} chunk(s)"
        + (f", {size / len(frame):.1f} bytes/row" if len(frame) else ""),
    }


def check_table(data: pd.DataFrame, empty_error: type[ValueError] = ValueError) -> None:
    """Raise ``ValueError`` unless ``data`` is a long probe table with the schema's columns, and
    ``empty_error`` (a ``ValueError``) when it has no rows."""
    if not isinstance(data, pd.DataFrame):
        raise ValueError(f"data must be a pandas DataFrame, got {type(data).__name__}")
    missing = [c for c in COLUMNS if c not in data.columns]
    if missing:
        raise ValueError(f"data is missing columns {missing}; expected {list(COLUMNS)}")
    if data.empty:
        raise empty_error("data has no rows")
