"""How many CPU threads torch's parallel regions use: as many as cores are free, re-checked as work goes on.

torch's default is one intra-op thread per core. On a machine where other programs use the CPU, every
parallel region then waits for a thread that another process has pre-empted: a small elementwise op
that takes microseconds alone takes milliseconds, and two runs at once each run several times slower
than alone. :class:`ThreadPolicy` uses instead as many threads as cores are free: the cores this
process may use (its CPU affinity) less those other processes keep busy (the runnable tasks of
``/proc/loadavg`` less this process's own running threads, the median of a few samples), at least one.
It is checked again every few seconds at step boundaries, so a run that started alone gives cores
back when another starts beside it, and takes them again when it ends; a change is made only when
two checks in a row agree.

``train``, ``demo`` and ``profile`` apply it on the CPU (``--threads N`` or ``threads=N`` fixes the count
instead; on a GPU nothing changes) and log the choice once, then each change. Floating-point sums in
parallel regions depend on the thread count, so a run whose count changed may differ from another in
the last bits; fix ``--threads`` for bit-identical reruns.

Measured on 2 cores (``benchmarks/busy_machine.py``): a narrow model (the ``small`` preset, 64 wide)
trains 1.5x faster alone on 2 threads than on 1, so the width of the model does not enter the rule.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

from gpas_probe.config import check_threads

log = logging.getLogger(__name__)


def usable_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def own_running() -> int:
    """This process's threads that are running or runnable now (at least this one)."""
    count = 0
    try:
        for task in Path("/proc/self/task").iterdir():
            try:
                stat = (task / "stat").read_text()
            except OSError:
                continue
            count += stat[stat.rfind(")") + 2:].startswith("R")
    except OSError:
        return 1
    return max(1, count)


def busy_cores(samples: int = 5, interval_s: float = 0.01) -> int:
    """How many cores other processes keep busy now: the median over ``samples`` of the runnable tasks
    (``/proc/loadavg``'s fourth field) less this process's own; 0 where that is unknown."""
    counts = []
    for i in range(samples):
        try:
            with open("/proc/loadavg") as f:
                running = int(f.read().split()[3].split("/")[0])
        except (OSError, ValueError, IndexError):
            return 0
        counts.append(max(0, running - own_running()))
        if i + 1 < samples:
            time.sleep(interval_s)
    return sorted(counts)[len(counts) // 2]


def choose_threads(*, cores: int | None = None, busy: int | None = None) -> tuple[int, str]:
    """The intra-op thread count for the cores free now, and why."""
    cores = usable_cores() if cores is None else cores
    busy = busy_cores() if busy is None else busy
    free = max(1, cores - busy)
    return free, (f"all {cores} cores free" if busy == 0 else f"{min(busy, cores)} of {cores} cores busy "
                  f"with other work")


class ThreadPolicy:
    """The thread count of one run: ``threads`` fixed, or 0 for the free cores (module doc), re-checked by
    :meth:`check` at most every ``every_s`` seconds; on a GPU device it does nothing."""

    def __init__(self, threads: int = 0, device: torch.device | str = "cpu", every_s: float = 5.0) -> None:
        self.threads, self.every_s = check_threads(threads), every_s
        self.active = torch.device(device).type == "cpu"
        self._last = time.monotonic()
        self._pending: int | None = None

    def apply(self) -> int:
        """Set the count now (logged); returns it."""
        if not self.active:
            return torch.get_num_threads()
        n, why = (self.threads, "as asked") if self.threads else choose_threads()
        torch.set_num_threads(n)
        log.info("using %d CPU thread(s): %s", n, why)
        self._last = time.monotonic()
        return n

    def check(self, *_: object) -> None:
        """At a step boundary: follow the free cores (a change needs two checks in a row to agree)."""
        if not self.active or self.threads or time.monotonic() - self._last < self.every_s:
            return
        self._last = time.monotonic()
        n, why = choose_threads(busy=busy_cores(samples=3, interval_s=0.002))
        if n == torch.get_num_threads():
            self._pending = None
        elif self._pending == n:
            torch.set_num_threads(n)
            self._pending = None
            log.info("now %d CPU thread(s): %s", n, why)
        else:
            self._pending = n


def use_threads(threads: int = 0, device: torch.device | str = "cpu") -> ThreadPolicy:
    """Apply :class:`ThreadPolicy` once (``threads`` fixed, or 0 for the free cores) and return it."""
    policy = ThreadPolicy(threads, device)
    policy.apply()
    return policy
