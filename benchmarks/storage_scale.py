"""The probe table at scale: write 10 million rows, then load them and draw the variance figure.

Rows go through the real :class:`~gpas_probe.store.ProbeWriter` one ``add`` at a time, in the
pattern a :class:`~gpas_probe.probes.Probe` writes them: per recorded step, for each of ``--layers``
decoder layers, var/rms/absmax of the five residual sites forward and backward (30 rows), the
shortcut/branch ratio and cosine of both sub-layers (4), grad norm, weight norm and update ratio (3)
and the four GPAS gate statistics (4), then the five model-level rows: 41 x 24 + 5 = 989 rows a step,
so 10 million rows are about 10,100 recorded steps. Values are smooth trajectories with noise (as
real statistics are; pure noise would not compress at all).

Each phase runs in a fresh process so its peak RSS is its own:

1. write: rows per second, bytes per row on disk, and the resident memory as the rows accumulate
   (bounded: the writer keeps at most ``flush_rows`` rows before writing a chunk);
2. load + plot: :func:`~gpas_probe.store.load_run` on the run, then
   ``gpas_probe.plots.make_figure("variance", frame)`` and ``savefig``; time and peak RSS.

Goals: load_run + variance figure <= 15 s and <= 2 GB peak memory; write memory bounded.

    python benchmarks/storage_scale.py [--rows 10000000] [--layers 24] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _machine import describe

GOAL_SECONDS = 15.0
GOAL_MIB = 2048.0
SITES = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")
GATE_STATS = ("alpha", "silu_alpha", "scale", "alpha_grad")
MODEL_STATS = ("loss", "val_loss", "lr", "grad_norm", "tokens")


def rss_mib() -> tuple[float, float]:
    """(current, peak) resident set size of this process in MiB (Linux; peak from getrusage elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if line.startswith(("VmRSS", "VmHWM")))
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024
    except (OSError, KeyError):
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = kib / (1024 * 1024 if sys.platform == "darwin" else 1024)
        return peak, peak


def template(layers: int) -> list[tuple[int, str, str, str]]:
    """The (layer, site, direction, stat) of one recorded step's rows, in the order a probe writes them."""
    rows = []
    for layer in range(layers):
        rows += [(layer, site, d, stat) for site in SITES for d in ("fwd", "bwd") for stat in ("var", "rms", "absmax")]
        rows += [(layer, sub, "fwd", stat) for sub in ("attn", "mlp")
                 for stat in ("shortcut_branch_ratio", "shortcut_branch_cos")]
        rows += [(layer, "params", "none", stat) for stat in ("grad_norm", "weight_norm", "update_ratio")]
        rows += [(layer, "gpas", "none", stat) for stat in GATE_STATS]
    rows += [(-1, "model", "none", stat) for stat in MODEL_STATS]
    return rows


def write_phase(run: Path, rows: int, layers: int, flush_rows: int, flush_steps: int) -> dict:
    from gpas_probe.store import PROBES_DIR, ProbeWriter

    rng = np.random.default_rng(0)
    tmpl = template(layers)
    depth = np.array([max(layer, 0) for layer, *_ in tmpl], dtype=np.float64)
    base = np.exp(rng.normal(0.0, 1.0, len(tmpl)))
    steps = -(-rows // len(tmpl))
    writer = ProbeWriter(run / PROBES_DIR, "scale", {"benchmark": "storage_scale"},
                         flush_rows=flush_rows, flush_steps=flush_steps)
    add = writer.add
    marks = {max(1, steps // 10): "10%", max(1, steps // 2): "50%"}
    rss_at = {}
    written = 0
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        values = (base * (1 + depth * np.log1p(step) / 10) * (1 + 0.01 * rng.standard_normal(len(tmpl)))).tolist()
        n = min(len(tmpl), rows - written)
        for (layer, site, direction, stat), value in zip(tmpl[:n], values[:n], strict=True):
            add(step, layer, site, direction, stat, value)
        written += n
        writer.end_step()
        if step in marks:
            rss_at[f"{marks[step]} ({written:,} rows)"] = rss_mib()[0]
    writer.close()
    seconds = time.perf_counter() - t0
    rss_at[f"100% ({written:,} rows)"] = rss_mib()[0]
    files = writer.parts
    size = sum(f.stat().st_size for f in files)
    return {"rows": written, "steps": steps, "seconds": seconds, "bytes": size, "chunks": len(files),
            "rss_at": rss_at, "peak_mib": rss_mib()[1]}


def load_phase(run: Path, figure: str, out_png: Path) -> dict:
    t0 = time.perf_counter()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gpas_probe.plots import make_figure
    from gpas_probe.store import load_run

    t_import = time.perf_counter() - t0
    start_mib = rss_mib()[0]
    t0 = time.perf_counter()
    frame = load_run(run)
    t_load = time.perf_counter() - t0
    load_peak_mib = rss_mib()[1]
    frame_mib = frame.memory_usage(deep=True).sum() / 2**20
    t0 = time.perf_counter()
    fig = make_figure(figure, frame)
    t_plot = time.perf_counter() - t0
    t0 = time.perf_counter()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    t_save = time.perf_counter() - t0
    return {"rows": len(frame), "import_s": t_import, "load_s": t_load, "plot_s": t_plot, "save_s": t_save,
            "frame_mib": frame_mib, "start_mib": start_mib, "load_peak_mib": load_peak_mib,
            "peak_mib": rss_mib()[1]}


def child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine() -> str:
    import pandas as pd
    import pyarrow as pa

    return describe(f"pandas {pd.__version__}, pyarrow {pa.__version__}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--flush-rows", type=int, default=100_000, help="the writer's flush_rows (ProbeConfig's default)")
    ap.add_argument("--flush-steps", type=int, default=50, help="the writer's flush_steps (ProbeConfig's default)")
    ap.add_argument("--figure", default="variance", help="figure kind to draw (gpas_probe.plots.FIGURES)")
    ap.add_argument("--keep", type=Path, help="write the run here and keep it (default: a temporary folder)")
    ap.add_argument("--phase", choices=("write", "load"), help=argparse.SUPPRESS)  # child process
    ap.add_argument("--run", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase == "write":
        print(json.dumps(write_phase(args.run, args.rows, args.layers, args.flush_rows, args.flush_steps)))
        return
    if args.phase == "load":
        print(json.dumps(load_phase(args.run, args.figure, args.run / f"{args.figure}.png")))
        return

    print(f"machine: {machine()}")
    tmp = None
    if args.keep is not None:
        run = args.keep
        if run.exists():
            raise SystemExit(f"error: {run} exists; give a new folder to --keep")
    else:
        tmp = tempfile.mkdtemp(prefix="storage_scale_")
        run = Path(tmp) / "run"
    try:
        w = child(["--phase", "write", "--run", str(run), "--rows", str(args.rows), "--layers", str(args.layers),
                   "--flush-rows", str(args.flush_rows), "--flush-steps", str(args.flush_steps)])
        print(f"\nwrite: {w['rows']:,} rows ({w['steps']:,} recorded steps x {len(template(args.layers))} rows, "
              f"{args.layers} layers) in {w['seconds']:.1f} s ({w['rows'] / w['seconds']:,.0f} rows/s through "
              f"ProbeWriter.add), {w['chunks']} chunks")
        print(f"       {w['bytes']:,} bytes on disk = {w['bytes'] / w['rows']:.2f} bytes/row")
        rss = ", ".join(f"{v:.0f} MiB at {k}" for k, v in w["rss_at"].items())
        print(f"       resident memory while writing: {rss}"
              + f"; peak {w['peak_mib']:.0f} MiB")
        growth = list(w["rss_at"].values())[-1] - list(w["rss_at"].values())[0]
        r = child(["--phase", "load", "--run", str(run), "--figure", args.figure])
        total = r["load_s"] + r["plot_s"] + r["save_s"]
        print(f"\nload_run: {r['rows']:,} rows in {r['load_s']:.2f} s (a DataFrame of {r['frame_mib']:.0f} MiB)")
        print(f"make_figure({args.figure!r}): {r['plot_s']:.2f} s; savefig: {r['save_s']:.2f} s "
              f"(imports before: {r['import_s']:.1f} s, RSS {r['start_mib']:.0f} MiB)")
        print(f"peak RSS of the load + plot process: {r['peak_mib']:.0f} MiB (after load_run: "
              f"{r['load_peak_mib']:.0f} MiB)")
        print("\nsummary | quantity | measured | goal | verdict")
        print(f"summary | bytes per row | {w['bytes'] / w['rows']:.2f} | reported | -")
        print(f"summary | write RSS growth 10% -> 100% of rows | {growth:+.0f} MiB | bounded | "
              f"{'met' if growth < 100 else 'check'}")
        print(f"summary | load_run + {args.figure} figure + savefig | {total:.1f} s | <= {GOAL_SECONDS:.0f} s | "
              f"{'met' if total <= GOAL_SECONDS else f'missed by {total - GOAL_SECONDS:.1f} s'}")
        peak = r["peak_mib"]
        print(f"summary | peak memory of load + plot | {peak:.0f} MiB | <= {GOAL_MIB:.0f} MiB | "
              f"{'met' if peak <= GOAL_MIB else f'missed by {peak - GOAL_MIB:.0f} MiB'}")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
