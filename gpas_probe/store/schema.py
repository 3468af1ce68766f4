"""The probe table's schema (DESIGN §7): one long table per run, written as parquet chunks.

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

import re
from pathlib import Path

import pandas as pd
import pyarrow as pa

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
#: The pandas dtypes of a frame in the schema (strings as pandas' default string type).
PANDAS_DTYPES = {"run_id": str, "step": "int64", "layer": "int16", "site": str, "direction": str, "stat": str,
                 "value": "float64"}
#: The key of one statistic; a resumed run may repeat it, and :func:`~gpas_probe.store.load_run` keeps the last.
KEY_COLUMNS = ["step", "layer", "site", "direction", "stat"]

#: ``layer`` of model-level rows (loss, learning rate, ...), recorded at ``site`` :data:`MODEL_SITE`.
MODEL_LAYER = -1
MODEL_SITE = "model"
#: Sites of the GPAS gate rows: one shared gate per layer, or one per sub-layer.
GATE_SITES = ("gpas", "gpas_attn", "gpas_mlp")
#: Site of the per-layer importance rows of a profile (deletion, block influence); angular distances
#: between the streams entering layers l and l + n are at site ``angular_n{n}``.
IMPORTANCE_SITE = "importance"
ANGULAR_PREFIX = "angular_n"

_PART = re.compile(r"^part-(\d{6,})\.parquet$")


def part_files(directory: Path) -> list[Path]:
    """The chunks of a ``probes/`` folder, in write order."""
    return sorted(p for p in directory.iterdir() if _PART.match(p.name))


def part_number(path: Path) -> int:
    """The number of a chunk file (``part-000012.parquet`` -> 12)."""
    match = _PART.match(path.name)
    if match is None:
        raise ValueError(f"{path}: not a probe chunk name")
    return int(match.group(1))


def probes_dir(path: str | Path) -> Path:
    """A run folder's ``probes/`` folder; a ``probes/`` folder or a chunk file as it is."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such run directory or probe file")
    if p.is_dir() and (p / PROBES_DIR).is_dir():
        return p / PROBES_DIR
    return p


def empty_frame() -> pd.DataFrame:
    """A probe table with no rows and the documented columns and dtypes."""
    return ARROW_SCHEMA.empty_table().to_pandas()


def as_table_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with exactly the schema's columns, in order, and their dtypes."""
    return frame[list(COLUMNS)].astype(PANDAS_DTYPES).reset_index(drop=True)


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
