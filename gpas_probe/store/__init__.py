"""The probe table on disk (DESIGN §7): ``schema`` (columns, dtypes, folder layout, the sites and stats
the table speaks of), ``writer`` (chunked, atomic parquet writes; trimming a resumed run) and ``reader``
(:func:`load_run` and friends)."""

from gpas_probe.store.reader import load_run, load_runs, read_meta, run_info, run_writer
from gpas_probe.store.schema import ARROW_SCHEMA, COLUMNS, KEY_COLUMNS, PROBES_DIR, check_table, empty_frame
from gpas_probe.store.writer import (
    IF_EXISTS,
    MemoryWriter,
    NullWriter,
    ProbeWriter,
    open_probe_folder,
    truncate_after,
)

__all__ = ["ARROW_SCHEMA", "COLUMNS", "IF_EXISTS", "KEY_COLUMNS", "PROBES_DIR", "MemoryWriter", "NullWriter",
           "ProbeWriter", "check_table", "empty_frame", "load_run", "load_runs", "open_probe_folder", "read_meta",
           "run_info", "run_writer", "truncate_after"]
