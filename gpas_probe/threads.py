"""How many CPU threads torch's parallel regions use, chosen for the work and for the cores actually free.

torch's default is one intra-op thread per core. On a machine where other programs use the CPU, every
parallel region then waits for a thread that another process has pre-empted: a small elementwise op
that takes microseconds alone takes milliseconds, and two runs at once each run several times slower
than alone. :func:`choose_threads` picks instead:

- as many threads as cores are free: the cores this process may use (its CPU affinity) minus those
  other processes keep busy right now (the runnable tasks of ``/proc/loadavg``, sampled a few times,
  less this process's own), at least one;
- one thread for narrow models (hidden size below :data:`NARROW`), whose parallel regions are too
  short to gain from more.

``train``, ``demo`` and ``profile`` apply it on the CPU (``--threads N`` or ``threads=N`` overrides it;
on a GPU nothing changes) through :func:`use_threads`, which logs the choice and its reason once.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

#: Below this hidden size one thread is used whatever the machine (see the module doc).
NARROW = 128


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    reason: str


def usable_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def busy_cores(samples: int = 5, interval_s: float = 0.02) -> int:
    """How many cores other processes keep busy now: the median over ``samples`` of the runnable tasks
    (``/proc/loadavg``'s fourth field) less this process's own thread; 0 where that is unknown."""
    counts = []
    for i in range(samples):
        try:
            with open("/proc/loadavg") as f:
                running = int(f.read().split()[3].split("/")[0])
        except (OSError, ValueError, IndexError):
            return 0
        counts.append(max(0, running - 1))
        if i + 1 < samples:
            time.sleep(interval_s)
    return sorted(counts)[len(counts) // 2]


def choose_threads(hidden_size: int | None = None, *, cores: int | None = None,
                   busy: int | None = None) -> ThreadChoice:
    """The intra-op thread count for work on models ``hidden_size`` wide (module doc)."""
    cores = usable_cores() if cores is None else cores
    if hidden_size is not None and hidden_size < NARROW:
        return ThreadChoice(1, f"hidden size {hidden_size} < {NARROW}: parallel regions gain little")
    busy = busy_cores() if busy is None else busy
    free = max(1, cores - busy)
    if busy == 0:
        return ThreadChoice(free, f"all {cores} cores free")
    return ThreadChoice(free, f"{min(busy, cores)} of {cores} cores busy with other work")


def use_threads(threads: int = 0, *, hidden_size: int | None = None,
                device: torch.device | str = "cpu") -> int:
    """Set torch's intra-op threads: ``threads`` if positive, else :func:`choose_threads`; on a GPU the
    setting is left as it is. Returns the count in effect."""
    if threads < 0:
        raise ValueError(f"threads must be 0 (choose) or positive, got {threads}")
    if torch.device(device).type != "cpu":
        return torch.get_num_threads()
    choice = ThreadChoice(threads, "as asked") if threads else choose_threads(hidden_size)
    if choice.threads != torch.get_num_threads():
        torch.set_num_threads(choice.threads)
    log.info("using %d CPU thread(s): %s", choice.threads, choice.reason)
    return choice.threads
