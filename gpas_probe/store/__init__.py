"""The probe table on disk (DESIGN §7): ``schema`` (columns, dtypes, folder layout), ``writer``
(chunked, atomic parquet writes; trimming a resumed run) and ``reader`` (:func:`load_run` and friends)."""

from gpas_probe.store.reader import load_run, load_runs, read_meta, run_info
from gpas_probe.store.schema import (
    ANGULAR_PREFIX,
    ARROW_SCHEMA,
    COLUMNS,
    GATE_SITES,
    IMPORTANCE_SITE,
    KEY_COLUMNS,
    META_FILE,
    META_KEY,
    MODEL_LAYER,
    MODEL_SITE,
    PANDAS_DTYPES,
    PROBES_DIR,
    SCHEMA_VERSION,
    STRING_COLUMNS,
    as_table_frame,
    check_table,
    empty_frame,
)
from gpas_probe.store.writer import MemoryWriter, ProbeWriter, RowBuffer, git_revision, run_metadata, truncate_after

__all__ = [
    "ANGULAR_PREFIX", "ARROW_SCHEMA", "COLUMNS", "GATE_SITES", "IMPORTANCE_SITE", "KEY_COLUMNS", "META_FILE",
    "META_KEY", "MODEL_LAYER", "MODEL_SITE", "PANDAS_DTYPES", "PROBES_DIR", "SCHEMA_VERSION", "STRING_COLUMNS",
    "MemoryWriter", "ProbeWriter", "RowBuffer", "as_table_frame", "check_table", "empty_frame", "git_revision",
    "load_run", "load_runs", "read_meta", "run_info", "run_metadata", "truncate_after",
]
