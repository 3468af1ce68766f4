"""Reading the probe table: one run (:func:`load_run`), several (:func:`load_runs`), its metadata and a summary."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from gpas_probe.jsonfile import read_object
from gpas_probe.lock import holder
from gpas_probe.store.schema import (
    ARROW_SCHEMA,
    COLUMNS,
    KEY_COLUMNS,
    META_FILE,
    META_KEY,
    PROBES_DIR,
    STRING_COLUMNS,
    empty_frame,
    part_files,
    probes_dir,
)

_LOAD_SCHEMA = pa.schema([pa.field(f.name, pa.large_string() if f.name in STRING_COLUMNS else f.type)
                          for f in ARROW_SCHEMA])


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


def load_run(path: str | Path, run_id: str | None = None, *, dedupe: bool = True) -> pd.DataFrame:
    """One run's probe table: ``path`` is the run directory, its ``probes/`` folder or one chunk.

    ``run_id`` replaces the stored run id. With ``dedupe``, a statistic that a later chunk records
    again for the same step (a run resumed from a checkpoint older than its last chunk) keeps its
    last value; only rows of steps that several chunks share are compared. The table goes to pandas
    column by column, each Arrow column released once converted, and string data is not copied.
    """
    p = probes_dir(path)
    files = part_files(p) if p.is_dir() else [p]
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


def run_writer(path: str | Path) -> dict[str, Any] | None:
    """Who is writing the run at ``path`` (a run folder, its ``probes/`` or a chunk) right now, as
    :func:`gpas_probe.lock.holder` says (``text``: ``pid 123, train, since 12:00:01``), or None."""
    p = Path(path)
    folder = p if p.is_dir() and p.name != PROBES_DIR else p.parent
    if folder.name == PROBES_DIR:
        folder = folder.parent
    return holder(folder)


def load_runs(paths: Iterable[str | Path], run_ids: Sequence[str] | None = None, *,
              dedupe: bool = True, require_rows: bool = False) -> pd.DataFrame:
    """Several runs in one long table (see :func:`load_run`); ``run_ids`` replace the stored ids.
    ``require_rows``: a run with no rows yet is an error that names it and says whether it is still
    being written."""
    paths = list(paths)
    if run_ids is not None and len(run_ids) != len(paths):
        raise ValueError(f"got {len(run_ids)} run_ids for {len(paths)} runs")
    frames = [load_run(p, None if run_ids is None else run_ids[i], dedupe=dedupe) for i, p in enumerate(paths)]
    for path, frame in zip(paths, frames, strict=True):
        if require_rows and frame.empty:
            live = run_writer(path)
            raise ValueError(f"{path}: no probe rows yet; " + (
                f"the run is still running ({live['text']}) and writes its rows at least every 30 s: try again "
                "shortly" if live else "the run recorded none (probes off?) or stopped before writing any"))
    if not frames:
        return empty_frame()
    ids = [f["run_id"].iloc[0] for f in frames if len(f)]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ValueError(f"several runs share the run_id {dup}; pass run_ids= to tell them apart")
    return pd.concat(frames, ignore_index=True)


def read_meta(path: str | Path) -> dict[str, Any]:
    """A run's probe metadata, from ``_meta.json`` or, for a single chunk, its parquet metadata."""
    p = probes_dir(path)
    if p.is_dir():
        meta_path = p / META_FILE
        if not meta_path.exists():
            raise FileNotFoundError(f"{meta_path}: no probe metadata")
        return read_object(meta_path, "probe metadata")
    kv = pq.read_schema(p).metadata or {}
    if META_KEY not in kv:
        raise ValueError(f"{p}: no gpas_probe metadata in this parquet file")
    return json.loads(kv[META_KEY])


def natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sorts names with their numbers in order: ``angular_n2`` before ``angular_n10``."""
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", name))


class Extent(NamedTuple):
    """What a probe table holds: the steps with rows, the steps with per-layer rows (beyond the model
    rows), the layers and the sites (in natural order)."""

    steps: list[int]
    probed: list[int]
    layers: list[int]
    sites: list[str]


def extent(frame: pd.DataFrame) -> Extent:
    """The :class:`Extent` of a probe table."""
    per_layer = frame["layer"].to_numpy() >= 0
    return Extent(sorted(frame["step"].unique().tolist()), sorted(frame.loc[per_layer, "step"].unique().tolist()),
                  sorted(x for x in frame["layer"].unique().tolist() if x >= 0),
                  sorted(frame["site"].astype(str).unique().tolist(), key=natural_key))


def run_info(path: str | Path) -> dict[str, Any]:
    """A summary of a recorded run: steps, layers, sites, statistics, rows and bytes on disk."""
    p = probes_dir(path)
    frame = load_run(p)
    files = part_files(p) if p.is_dir() else [p]
    held = extent(frame)
    size = sum(f.stat().st_size for f in files)
    return {
        "run_id": frame["run_id"].iloc[0] if len(frame) else p.parent.name,
        "steps": f"{len(held.probed)} recorded by the probes, {len(held.steps)} with rows"
        + (f", {held.steps[0]}..{held.steps[-1]}" if held.steps else ""),
        "layers": len(held.layers),
        "sites": ", ".join(held.sites),
        "stats": ", ".join(sorted(frame["stat"].unique().tolist(), key=natural_key)),
        "rows": f"{len(frame):,}",
        "size": f"{size:,} bytes in {len(files)} chunk(s)"
        + (f", {size / len(frame):.1f} bytes/row" if len(frame) else ""),
    }


