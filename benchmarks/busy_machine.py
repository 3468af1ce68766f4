"""Training beside other work: the thread policy (``--threads 0``, the default) against torch's default
(one thread per core), with processes this script starts and stops itself.

For each setting, the wall time of whole ``gpas-probe train`` processes (``--steps`` steps, probes
every 10 steps as the CLI does by default) in four situations:

- alone;
- two runs at once (two seeds, or a notebook beside a run): the time until both are done;
- beside one, then two busy single-threaded processes (``while True: pass``).

Each situation is repeated ``--repeats`` times (median, spread printed). Goals (policy): two runs at
once within 2.5x the time of one alone, beside one busy process within 1.5x, and alone no slower than
the best fixed setting by more than 5%.

    python benchmarks/busy_machine.py                      # small preset (24 x 64), 30 steps
    python benchmarks/busy_machine.py --preset medium --steps 20
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _machine import describe


def _train(out: Path, preset: str, steps: int, threads: int, seed: int) -> subprocess.Popen:
    args = [sys.executable, "-m", "gpas_probe.cli.main", "train", "--preset", preset, "--steps", str(steps),
            "--out", str(out), "--overwrite", "--seed", str(seed), "--device", "cpu", "--threads", str(threads),
            "--eval-every", "0"]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _busy(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def run_situation(root: Path, preset: str, steps: int, threads: int, runs: int, busy: int) -> float:
    """Seconds until ``runs`` training processes started together are all done, beside ``busy`` loops."""
    loops = _busy(busy)
    try:
        time.sleep(1.0 if busy else 0.0)  # the loops are running before training starts
        t0 = time.perf_counter()
        procs = [_train(root / f"run{i}", preset, steps, threads, seed=i) for i in range(runs)]
        for p in procs:
            _, err = p.communicate()
            if p.returncode != 0:
                raise SystemExit(f"training failed: {err.strip().splitlines()[-1] if err.strip() else p.returncode}")
        return time.perf_counter() - t0
    finally:
        for p in loops:
            p.kill()
            p.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--settings", default="policy,torch default,1", help="policy, 'torch default' (one "
                        "thread per core) or a thread count, comma-separated")
    a = parser.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    settings = {s.strip(): 0 if s.strip() == "policy" else cores if s.strip() == "torch default" else int(s)
                for s in a.settings.split(",")}
    situations = {"alone": (1, 0), "two at once": (2, 0), "beside 1 busy": (1, 1), "beside 2 busy": (1, 2)}
    times: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.repeats):
            for name, threads in settings.items():
                for situation, (runs, busy) in situations.items():
                    if situation != "alone" and name not in ("policy", "torch default"):
                        continue
                    t = run_situation(Path(tmp), a.preset, a.steps, threads, runs, busy)
                    times.setdefault((name, situation), []).append(t)
                    print(f"  round {r + 1}: {name:13s} {situation:14s} {t:6.1f} s", flush=True)
    print(f"\nmachine: {describe()}")
    print(f"work: gpas-probe train --preset {a.preset} --steps {a.steps} (whole processes); median of {a.repeats}")
    med = {k: statistics.median(v) for k, v in times.items()}
    for (name, situation), t in med.items():
        spread = f"{min(times[name, situation]):.1f} to {max(times[name, situation]):.1f}"
        alone = med[name, "alone"]
        print(f"{name:13s} {situation:14s} {t:6.1f} s ({spread}) = {t / alone:.2f}x alone")
    if ("policy", "alone") in med:
        alone = med["policy", "alone"]
        for situation, goal in (("two at once", 2.5), ("beside 1 busy", 1.5)):
            if ("policy", situation) in med:
                ratio = med["policy", situation] / alone
                print(f"summary | policy {situation} {ratio:.2f}x alone | goal <= {goal} | "
                      f"{'met' if ratio <= goal else 'missed'}")
        best = min(t for (n, s), t in med.items() if s == "alone")
        ratio = alone / best
        print(f"summary | policy alone {ratio:.3f}x the best setting alone | goal <= 1.05 | "
              f"{'met' if ratio <= 1.05 else 'missed'}")


if __name__ == "__main__":
    main()
