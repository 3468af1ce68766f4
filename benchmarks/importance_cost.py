"""Cost of deletion importance: prefix reuse vs delete-and-rerun, and memory vs number of batches.

Builds the ``small`` preset (24 layers x 64) with random weights, times
:func:`~gpas_probe.analysis.importance.deletion_importance` (prefix reuse) against
:func:`~gpas_probe.analysis.importance.naive_deletion_importance` on the same batches in one process
(interleaved repeats, best of each), and reports the peak-RSS growth when the number of streamed
batches doubles. Goal: ratio <= 0.6, RSS growth ~0.

    python benchmarks/importance_cost.py [--batches 4] [--batch-size 8] [--seq-len 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from collections.abc import Iterator

import numpy as np
import torch
from _machine import torch_setup

from gpas_probe.analysis.importance import deletion_importance, naive_deletion_importance
from gpas_probe.config import ModelConfig
from gpas_probe.data import Batches, builtin_corpus
from gpas_probe.model import build_model


def peak_rss_mib() -> float:
    """Peak resident set size of this process (Linux: VmHWM, which :func:`reset_peak_rss` resets)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return kib / (1024 * 1024 if sys.platform == "darwin" else 1024)


def reset_peak_rss() -> bool:
    """Reset the peak-RSS mark to the current RSS (Linux only); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def stream(batches: Batches, n: int, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` batches made one at a time (nothing accumulates on the caller's side)."""
    for step in range(n):
        ids, labels = batches.train(step)
        yield ids.to(device), labels.to(device)


def timed(fn, *args) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rss-batches", type=int, default=16, help="N for the N vs 2N peak-RSS check")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--rss-only", type=int, default=0, help=argparse.SUPPRESS)  # child: run N batches
    args = ap.parse_args()
    device = torch_setup(args.threads, args.device)
    torch.manual_seed(0)
    config = ModelConfig.from_preset("small")
    model = build_model(config).to(device).eval()
    data = Batches(builtin_corpus(), args.batch_size, args.seq_len, seed=0)
    if args.rss_only:
        reset_peak_rss()  # forget the peak of loading the corpus
        before = peak_rss_mib()
        deletion_importance(model, stream(data, args.rss_only, device))
        print(f"{before} {peak_rss_mib()}")
        return
    print(f"model: small preset, {config.num_layers} layers x {config.hidden_size}, "
          f"{model.num_parameters():,} parameters, device {device}, torch threads {torch.get_num_threads()}")
    print(f"batches: {args.batches} x ({args.batch_size} x {args.seq_len})")

    # same numbers from both (the acceptance criterion, also checked in tests/test_importance.py)
    fast = deletion_importance(model, stream(data, args.batches, device))
    slow = naive_deletion_importance(model, stream(data, args.batches, device))
    diff = float(np.abs(fast["loss_deleted"].to_numpy() - slow["loss_deleted"].to_numpy()).max())
    print(f"max |loss_deleted(prefix reuse) - loss_deleted(naive)| = {diff:.2e}")

    reuse, naive = [], []
    for _ in range(args.repeats):  # interleaved so drifting machine load hits both alike
        reuse.append(timed(deletion_importance, model, stream(data, args.batches, device)))
        naive.append(timed(naive_deletion_importance, model, stream(data, args.batches, device)))
    L = config.num_layers
    print(f"prefix reuse: best {min(reuse):.3f} s, median {np.median(reuse):.3f} s "
          f"({L + L * (L - 1) // 2} block calls per batch)")
    print(f"naive rerun : best {min(naive):.3f} s, median {np.median(naive):.3f} s "
          f"({L + L * (L - 1)} block calls per batch)")
    print(f"ratio (best/best): {min(reuse) / min(naive):.3f}x   "
          f"ratio (median/median): {np.median(reuse) / np.median(naive):.3f}x   (goal <= 0.6x)")

    n = args.rss_batches
    rss = {}
    for k in (n, 2 * n):  # a fresh process each, so an earlier run's high-water mark hides nothing
        cmd = [sys.executable, __file__, "--rss-only", str(k), "--batch-size", str(args.batch_size),
               "--seq-len", str(args.seq_len), "--device", args.device, "--threads", str(args.threads)]
        before, after = map(float, subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split())
        rss[k] = after
        print(f"peak RSS, {k} batches: {after:.1f} MiB (before the pass: {before:.1f} MiB, "
              f"the pass adds {after - before:+.1f} MiB)")
    print(f"peak RSS growth when doubling batches {n} -> {2 * n}: {rss[2 * n] - rss[n]:+.1f} MiB")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        deletion_importance(model, stream(data, n, device))
        peak_n = torch.cuda.max_memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
        deletion_importance(model, stream(data, 2 * n, device))
        peak_2n = torch.cuda.max_memory_allocated() / 2**20
        print(f"peak GPU memory: {peak_n:.1f} MiB ({n} batches), {peak_2n:.1f} MiB ({2 * n} batches)")


if __name__ == "__main__":
    main()
