"""``load_run``'s de-duplication, which only compares rows of steps that several chunks share, gives what a
plain pandas ``drop_duplicates`` over all chunks gives."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from gpas_probe.store import COLUMNS, KEY_COLUMNS, ProbeWriter, load_run


def _write_chunks(directory: Path, step_sets: list[list[int]], rng: np.random.Generator) -> None:
    for steps in step_sets:  # one writer (and chunk) per list, as a resumed run appends
        w = ProbeWriter(directory, "r", flush_rows=10**9, flush_steps=10**9)
        for step in steps:
            for layer in (-1, 0, 1):
                for site, stat in (("resid_post", "var"), ("attn", "shortcut_branch_ratio"), ("model", "loss")):
                    w.add(step, layer, site, "fwd" if site != "model" else "none", stat, float(rng.normal()))
            w.end_step()
        w.close()


@pytest.mark.parametrize("step_sets", [
    [[1, 2, 3], [4, 5], [6, 9]],  # a plain run: no step in two chunks
    [[1, 2, 3, 4, 5], [3, 4, 5, 6], [6, 7]],  # resumed twice from older checkpoints
    [[1, 3, 5, 7], [2, 4, 6], [5, 8]],  # ranges overlap; only step 5 is shared
    [[10, 11], [1, 2], [2, 10]],  # chunks out of step order
])
def test_load_run_dedupe_matches_pandas_drop_duplicates(tmp_path, step_sets: list[list[int]]) -> None:
    _write_chunks(tmp_path, step_sets, np.random.default_rng(len(step_sets[0])))
    raw = pd.concat([pq.read_table(p).to_pandas() for p in sorted(tmp_path.glob("part-*.parquet"))],
                    ignore_index=True)[list(COLUMNS)]
    reference = raw.drop_duplicates(KEY_COLUMNS, keep="last").reset_index(drop=True)
    got = load_run(tmp_path)
    pd.testing.assert_frame_equal(got.astype({c: object for c in ("run_id", "site", "direction", "stat")}),
                                  reference.astype({c: object for c in ("run_id", "site", "direction", "stat")}))
    assert all(pd.api.types.is_string_dtype(got[c]) for c in ("run_id", "site", "direction", "stat"))
    assert len(load_run(tmp_path, dedupe=False)) == len(raw)
