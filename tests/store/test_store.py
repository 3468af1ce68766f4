"""The parquet store: plain readers, types, atomic chunks, metadata, several runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from gpas_probe.store import COLUMNS, PROBES_DIR, ProbeWriter, empty_frame, load_run, load_runs, read_meta
from gpas_probe.store.schema import META_FILE, META_KEY, SCHEMA_VERSION

DTYPES = {"step": "int64", "layer": "int16", "value": "float64"}
STRING_COLUMNS = ("run_id", "site", "direction", "stat")


def _rows(n_steps: int, seed: int = 0) -> list[tuple]:
    rng = np.random.default_rng(seed)
    rows = []
    for step in range(1, n_steps + 1):
        for layer in (-1, 0, 1, 300):
            for site, direction, stat in (("resid_pre", "fwd", "rms"), ("resid_pre", "bwd", "absmax"),
                                          ("gpas", "none", "alpha")):
                rows.append((step * 1_000_000_007, layer, site, direction, stat, float(rng.standard_normal())))
    rows[3] = rows[3][:5] + (float("nan"),)
    rows[4] = rows[4][:5] + (float("-inf"),)
    return rows


def _write(directory, run_id="r", rows=None, meta=None, **kw) -> ProbeWriter:
    w = ProbeWriter(directory, run_id, meta or {"model_config": {"num_layers": 2}}, **kw)
    steps = {}
    for r in rows if rows is not None else _rows(5):
        steps.setdefault(r[0], []).append(r)
    for step_rows in steps.values():
        for r in step_rows:
            w.add(*r)
        w.end_step()
    w.close()
    return w


def _expected(rows: list[tuple], run_id: str) -> pd.DataFrame:
    return pd.DataFrame([(run_id, *r) for r in rows], columns=list(COLUMNS))


def _check_types(frame: pd.DataFrame) -> None:
    assert list(frame.columns) == list(COLUMNS)
    for col, dtype in DTYPES.items():
        assert frame[col].dtype == dtype, (col, frame[col].dtype)
    for col in STRING_COLUMNS:
        assert pd.api.types.is_string_dtype(frame[col]), (col, frame[col].dtype)


def _same(frame: pd.DataFrame, expected: pd.DataFrame) -> None:
    assert len(frame) == len(expected)
    for col in COLUMNS:
        got, exp = frame[col].to_numpy(), expected[col].to_numpy()
        if col == "value":
            np.testing.assert_array_equal(got, exp)  # NaN == NaN here, -inf kept
        else:
            assert [str(v) if col in STRING_COLUMNS else int(v) for v in got] == list(exp), col


def test_chunks_round_trip_through_plain_pandas(tmp_path) -> None:
    rows = _rows(5)
    w = _write(tmp_path / "run" / PROBES_DIR, rows=rows, flush_steps=2)
    names = sorted(p.name for p in (tmp_path / "run" / PROBES_DIR).iterdir())
    assert names == [META_FILE, "part-000000.parquet", "part-000001.parquet", "part-000002.parquet"]
    assert w.parts == sorted((tmp_path / "run" / PROBES_DIR).glob("part-*.parquet"))
    frame = pd.read_parquet(tmp_path / "run" / PROBES_DIR)
    _check_types(frame)
    _same(frame.sort_values(["step"], kind="stable").reset_index(drop=True), _expected(rows, "r"))
    one = pd.read_parquet(w.parts[0])
    _check_types(one)
    assert set(one.step) == {1_000_000_007, 2_000_000_014}


def test_plain_pandas_needs_no_gpas_probe(tmp_path) -> None:
    _write(tmp_path / "run" / PROBES_DIR, flush_steps=2)
    code = ("import json, sys, pandas as pd; f = pd.read_parquet(sys.argv[1]); "
            "assert 'gpas_probe' not in sys.modules; "
            "print(json.dumps({'columns': list(f.columns), 'dtypes': f.dtypes.astype(str).to_dict(), 'n': len(f)}))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run" / PROBES_DIR)], capture_output=True,
                         text=True, cwd=tmp_path, check=True).stdout
    got = json.loads(out)
    assert got["columns"] == list(COLUMNS) and got["n"] == len(_rows(5))
    assert {k: got["dtypes"][k] for k in DTYPES} == DTYPES


def test_load_run_accepts_the_run_dir_the_probes_dir_or_a_chunk(tmp_path) -> None:
    rows = _rows(4)
    w = _write(tmp_path / "run-a" / PROBES_DIR, run_id="run-a", rows=rows, flush_rows=10)
    assert len(w.parts) > 1
    for path in (tmp_path / "run-a", tmp_path / "run-a" / PROBES_DIR):
        frame = load_run(path)
        _check_types(frame)
        _same(frame, _expected(rows, "run-a"))
    assert len(load_run(w.parts[0])) == 12  # chunks end at step boundaries
    renamed = load_run(tmp_path / "run-a", run_id="baseline")
    _check_types(renamed)
    assert set(renamed.run_id) == {"baseline"}


def test_metadata_in_json_and_in_every_chunk(tmp_path) -> None:
    w = _write(tmp_path / "x" / PROBES_DIR, run_id="x", meta={"train_config": {"lr": 0.5}}, flush_steps=3)
    meta = json.loads((tmp_path / "x" / PROBES_DIR / META_FILE).read_text())
    assert meta["schema_version"] == SCHEMA_VERSION and meta["run_id"] == "x"
    assert meta["train_config"] == {"lr": 0.5}
    assert {"torch_version", "gpas_probe_version", "created", "git_revision", "columns"} <= set(meta)
    assert meta["columns"]["layer"] == "int16"
    for part in w.parts:
        assert json.loads(pq.read_schema(part).metadata[META_KEY]) == meta
        assert read_meta(part) == meta
    assert read_meta(tmp_path / "x") == meta


def test_load_runs_concatenates_with_run_ids(tmp_path) -> None:
    _write(tmp_path / "a" / PROBES_DIR, run_id="a", rows=_rows(2, seed=1))
    _write(tmp_path / "b" / PROBES_DIR, run_id="b", rows=_rows(3, seed=2))
    both = load_runs([tmp_path / "a", tmp_path / "b"])
    _check_types(both)
    assert both.groupby("run_id").size().to_dict() == {"a": len(_rows(2)), "b": len(_rows(3))}
    _same(both[both.run_id == "b"].reset_index(drop=True), _expected(_rows(3, seed=2), "b"))
    with pytest.raises(ValueError, match="run_id"):
        load_runs([tmp_path / "a", tmp_path / "a"])
    same_twice = load_runs([tmp_path / "a", tmp_path / "a"], run_ids=["first", "second"])
    assert same_twice.groupby("run_id").size().to_dict() == {"first": len(_rows(2)), "second": len(_rows(2))}


def test_a_failed_write_leaves_no_chunk_and_no_temporary_file(tmp_path, monkeypatch) -> None:
    d = tmp_path / "run" / PROBES_DIR
    w = ProbeWriter(d, "run")
    w.add(1, 0, "resid_pre", "fwd", "rms", 1.0)

    def crash(table, where, **kw):
        Path(where).write_bytes(b"half a parquet file")
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", crash)
    with pytest.raises(OSError, match="disk full"):
        w.flush()
    assert sorted(p.name for p in d.iterdir()) == [META_FILE]
    monkeypatch.undo()
    w.close()
    assert [p.name for p in w.parts] == ["part-000000.parquet"]
    (d / ".part-000001.parquet.tmp").write_bytes(b"left by a killed run")  # ignored by every reader
    assert len(load_run(d)) == 1 and len(pd.read_parquet(d)) == 1


def test_corrupted_chunk_is_named_in_the_error(tmp_path) -> None:
    w = _write(tmp_path / "run" / PROBES_DIR, flush_steps=1)
    bad = w.parts[2]
    bad.write_bytes(bad.read_bytes()[: len(bad.read_bytes()) // 2])
    with pytest.raises(ValueError, match=bad.name):
        load_run(tmp_path / "run")
    with pytest.raises(FileNotFoundError):
        load_run(tmp_path / "nowhere")
    (tmp_path / "not-a-run").mkdir()
    with pytest.raises(FileNotFoundError, match="no probe table"):
        load_run(tmp_path / "not-a-run")


def test_resumed_run_appends_and_keeps_the_last_value(tmp_path) -> None:
    d = tmp_path / "run" / PROBES_DIR
    _write(d, rows=[(1, 0, "resid_pre", "fwd", "rms", 1.0), (2, 0, "resid_pre", "fwd", "rms", 2.0)])
    created = read_meta(d)["created"]
    _write(d, rows=[(2, 0, "resid_pre", "fwd", "rms", 20.0), (3, 0, "resid_pre", "fwd", "rms", 3.0)])
    assert [p.name for p in sorted(d.glob("part-*"))] == ["part-000000.parquet", "part-000001.parquet"]
    assert read_meta(d)["created"] == created
    frame = load_run(d)
    assert frame.step.tolist() == [1, 2, 3] and frame.value.tolist() == [1.0, 20.0, 3.0]
    assert len(load_run(d, dedupe=False)) == 4


def test_a_run_without_rows_loads_as_an_empty_typed_table(tmp_path) -> None:
    ProbeWriter(tmp_path / "run" / PROBES_DIR, "run").close()
    for frame in (load_run(tmp_path / "run"), empty_frame(), load_runs([])):
        assert len(frame) == 0
        _check_types(frame)
    with pytest.raises(ValueError, match="flush_rows"):
        ProbeWriter(tmp_path / "other", "other", flush_rows=0)
