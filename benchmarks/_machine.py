"""The machine a benchmark ran on, in one line (shared by the benchmark scripts)."""

from __future__ import annotations

import os
import platform


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def load_average() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"


def describe(*parts: str) -> str:
    """``CPU (N cores); <parts>; load average a b c``."""
    return "; ".join([f"{cpu_model()} ({os.cpu_count()} cores)", *parts, f"load average {load_average()}"])


def torch_setup(threads: int, device: str):  # type: ignore[no-untyped-def]
    """Set torch's CPU threads (0 keeps torch's default) and return the device, exiting with one
    line when CUDA is asked for and absent."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but no CUDA device is available")
    return dev


def torch_machine(device) -> str:  # type: ignore[no-untyped-def]
    """CPU, torch threads, GPU and torch version (for the training benchmarks)."""
    import torch

    gpu = f", GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return describe(f"{torch.get_num_threads()} torch threads{gpu}", f"torch {torch.__version__}")
