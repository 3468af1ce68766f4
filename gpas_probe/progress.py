"""Progress for a person watching: a live bar in a terminal or a notebook, plain lines otherwise.

:class:`ProgressReport` is called with each step's :class:`~gpas_probe.training.StepInfo`. In a terminal or
a Jupyter notebook it draws a bar (step, loss, tokens/s, elapsed, eta) on stderr; where output is a file
or a pipe (``nohup``, CI) it logs one line every ``every_s`` seconds and at the last step through the
``gpas_probe.progress`` logger (the command line shows that logger's lines; in Python, configure
logging to see them). :class:`PhaseReport` does the same for work in phases (a profile: reading the
data, loading each checkpoint, its batches), from the first second.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

log = logging.getLogger(__name__)

MODES = ("auto", "bar", "lines", "off")


def _clock(seconds: float) -> str:
    s = int(max(0.0, seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _resolve(mode: str, console: Console | None) -> tuple[Console, str]:
    """The console to draw on (stderr by default) and the mode, ``auto`` resolved: a bar in a terminal or
    a notebook, else lines."""
    if mode not in MODES:
        raise ValueError(f"unknown progress mode {mode!r}; choose one of {', '.join(MODES)}")
    console = console or Console(stderr=True)
    if mode == "auto":
        mode = "bar" if console.is_terminal or console.is_jupyter else "lines"
    return console, mode


def bar_columns(fields: str = "") -> list[Any]:
    """The columns of every bar the project draws: label, bar, n/total, ``fields``, elapsed, eta."""
    columns: list[Any] = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn()]
    if fields:
        columns.append(TextColumn(fields))
    return columns + [TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]


class ProgressReport:
    """Reports steps ``start + 1 .. total`` of run ``label``; ``mode`` is one of :data:`MODES`
    (``auto``: a bar when ``console`` is a terminal or a notebook, else lines). The bar appears with the
    first step, so that an error during set-up prints alone. Use as a callable, then :meth:`close`."""

    def __init__(self, label: str, total: int, *, start: int = 0, mode: str = "auto", every_s: float = 30.0,
                 console: Console | None = None) -> None:
        self.console, mode = _resolve(mode, console)
        self.label, self.total, self.start, self.mode, self.every_s = label, total, start, mode, every_s
        self._bar: Progress | None = None
        self._task: Any = None
        self._t0 = time.monotonic()
        self._last_line = self._t0

    def __call__(self, info: Any) -> None:
        if self.mode == "bar":
            self._draw(info)
        elif self.mode == "lines":
            now = time.monotonic()
            if now - self._last_line >= self.every_s or info.step >= self.total:
                self._last_line = now
                log.info("%s", self.line(info, now - self._t0))

    def line(self, info: Any, elapsed: float) -> str:
        """One progress line: ``label: step s/total (p%), loss, tok/s, elapsed, eta``."""
        done = info.step - self.start
        left = self.total - info.step
        eta = elapsed / done * left if done > 0 else float("nan")
        val = f", val {info.val_loss:.4f}" if getattr(info, "val_loss", None) is not None else ""
        return (f"{self.label}: step {info.step}/{self.total} ({info.step / self.total:.0%}), loss {info.loss:.4f}"
                f"{val}, {info.tokens_per_s:,.0f} tok/s, elapsed {_clock(elapsed)}"
                + (f", eta {_clock(eta)}" if eta == eta else ""))

    def _draw(self, info: Any) -> None:
        if self._bar is None:
            self._bar = Progress(*bar_columns("loss {task.fields[loss]} | {task.fields[tps]} tok/s"),
                                 console=self.console, transient=False)
            self._task = self._bar.add_task(self.label, total=self.total, completed=self.start, loss="-", tps="-")
            self._bar.start()
        self._bar.update(self._task, completed=info.step, loss=f"{info.loss:.3f}", tps=f"{info.tokens_per_s:,.0f}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


class PhaseReport:
    """Progress of work in phases (reading data, loading a model, ``completed`` of ``total`` batches), from
    the first second: ``update(text, completed, total)`` says what is under way (``completed`` of ``total``
    units, which ``unit`` names). ``mode`` as for
    :class:`ProgressReport`. Nothing shows for the first ``quiet_s`` seconds (an error there prints alone);
    then a bar (updated live, with the current phase) or a line every ``every_s`` seconds, kept coming by a
    timer even while one phase (a long load) sends no update, and a last line at :meth:`finish`."""

    def __init__(self, label: str, *, mode: str = "auto", every_s: float = 10.0, quiet_s: float = 1.0,
                 unit: str = "batch", console: Console | None = None, timer: bool = True) -> None:
        self.console, mode = _resolve(mode, console)
        self.label, self.mode, self.every_s, self.quiet_s, self.unit = label, mode, every_s, quiet_s, unit
        self.text, self.completed, self.total = "starting", 0, 0
        self._t0 = time.monotonic()
        self._last_line: float | None = None
        self._bar: Progress | None = None
        self._task: Any = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        if timer and mode != "off":
            self._thread = threading.Thread(target=self._tick, name="gpas-probe-progress", daemon=True)
            self._thread.start()

    def update(self, text: str, completed: int, total: int) -> None:
        with self._lock:
            self.text, self.completed, self.total = text, completed, total
            if self._bar is not None:
                self._bar.update(self._task, description=f"{self.label}: {text}", completed=completed,
                                 total=total or None)
        self.poll()

    def line(self, elapsed: float) -> str:
        """``label: text, unit c/t (p%), elapsed, eta``."""
        parts = [f"{self.label}: {self.text}"]
        if self.total:
            parts.append(f"{self.unit} {self.completed}/{self.total} ({self.completed / self.total:.0%})")
        parts.append(f"elapsed {_clock(elapsed)}")
        if self.total and self.completed:
            parts.append(f"eta {_clock(elapsed / self.completed * (self.total - self.completed))}")
        return ", ".join(parts)

    def poll(self, now: float | None = None) -> None:
        """Show what is due at ``now`` (default: the clock): the bar once ``quiet_s`` have passed, a line
        every ``every_s`` seconds after that."""
        now = time.monotonic() if now is None else now
        elapsed = now - self._t0
        if self.mode == "off" or elapsed < self.quiet_s:
            return
        with self._lock:
            if self.mode == "bar" and self._bar is None and not self._stop.is_set():
                self._bar = Progress(*bar_columns(), console=self.console, transient=False)
                self._task = self._bar.add_task(f"{self.label}: {self.text}", total=self.total or None,
                                                completed=self.completed)
                self._bar.start()
            elif self.mode == "lines" and (self._last_line is None or now - self._last_line >= self.every_s):
                self._last_line = now
                log.info("%s", self.line(elapsed))

    def _tick(self) -> None:
        while not self._stop.wait(0.25):
            self.poll()

    def finish(self, text: str) -> None:
        """The work is done: a last line (lines mode) or the bar at its end."""
        with self._lock:
            self.text = text
            if self.mode == "lines":
                log.info("%s", self.line(time.monotonic() - self._t0))
            elif self._bar is not None:
                self._bar.update(self._task, description=f"{self.label}: {text}", completed=self.completed)
        self.close()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        with self._lock:
            if self._bar is not None:
                self._bar.stop()
                self._bar = None
