"""How well the first-order deletion estimate ranks the layers of trained models, and what it saves.

For each run or checkpoint folder given, profiles the latest checkpoint three ways on the same evaluation
tokens (importance only, no statistics): exact deletion, the estimate, and both. Prints, per model, the
Spearman rank correlation of the estimate with exact deletion, whether the two agree on the most and the
least important layer of the deep half, and each mode's time.

    python benchmarks/estimate_rank.py runs/pre runs/pre-gpas --seq-len 128
    python benchmarks/estimate_rank.py runs/seeds/* --batches 8 --batch-size 8 --seq-len 128
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from _machine import describe, torch_setup

from gpas_probe.analysis.evidence import estimate_agreement
from gpas_probe.profile import ProfileConfig, profile_many
from gpas_probe.store import load_run


def _layer_values(frame, stat: str) -> np.ndarray:  # type: ignore[no-untyped-def]
    rows = frame[(frame["stat"] == stat) & (frame["layer"] >= 0)].sort_values("layer")
    return rows["value"].to_numpy(dtype=float)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--data", default="builtin")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=0)
    a = parser.parse_args()
    torch_setup(a.threads, "cpu")
    sizes = dict(data=a.data, batches=a.batches, batch_size=a.batch_size, seq_len=a.seq_len, activations=False,
                 device="cpu")
    rhos = []
    print("run | layers | Spearman | deep top agrees | deep bottom agrees | exact s | estimate s | speed-up")
    for run in a.runs:
        with tempfile.TemporaryDirectory() as tmp:
            seconds = {}
            for mode in ("exact", "estimate", "both"):
                t0 = time.perf_counter()
                (folder,) = profile_many([run], Path(tmp) / mode, ProfileConfig.of(deletion=mode, **sizes),
                                         latest=True)
                seconds[mode] = time.perf_counter() - t0
            frame = load_run(folder)
        agree = estimate_agreement(frame)
        assert agree is not None, f"{run}: no exact deletion and estimate rows"
        exact, estimate = _layer_values(frame, "deletion_delta"), _layer_values(frame, "deletion_estimate")
        deep = slice(len(exact) // 2, None)
        top = int(np.argmax(exact[deep]) == np.argmax(estimate[deep]))
        bottom = int(np.argmin(exact[deep]) == np.argmin(estimate[deep]))
        rhos.append(agree["spearman"])
        print(f"{run.name} | {agree['layers']} | {agree['spearman']:.3f} | {'yes' if top else 'no'} | "
              f"{'yes' if bottom else 'no'} | {seconds['exact']:.1f} | {seconds['estimate']:.1f} | "
              f"{seconds['exact'] / seconds['estimate']:.1f}x")
    print(f"\nmachine: {describe()}")
    print(f"tokens per model: {a.batches} x {a.batch_size} x {a.seq_len}")
    print(f"summary | Spearman median {statistics.median(rhos):.3f}, min {min(rhos):.3f} over {len(rhos)} models")


if __name__ == "__main__":
    main()
