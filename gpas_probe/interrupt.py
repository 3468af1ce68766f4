"""Ctrl-C during training, handled at a step boundary.

Inside :func:`deferred_interrupt`, the first ``SIGINT`` only sets a flag: the training loop finishes the
step it is in, saves a checkpoint and the probe rows, and raises :class:`Interrupted`, so that
``--resume`` continues exactly there. A second ``SIGINT`` interrupts at once, as usual. Outside the main
thread, or when another handler than Python's default is installed, nothing changes.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

log = logging.getLogger(__name__)


class Interrupted(KeyboardInterrupt):
    """Training stopped at a step boundary after Ctrl-C; the message says where and what was saved."""


class _Flag:
    requested = False


@contextmanager
def deferred_interrupt(enabled: bool = True) -> Iterator[_Flag]:
    """A flag the loop polls at step boundaries; set by the first Ctrl-C while the block runs."""
    flag = _Flag()
    if not enabled or threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield flag
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        if flag.requested:
            raise KeyboardInterrupt
        flag.requested = True
        log.warning("interrupt: stopping after this step (a checkpoint is saved); press Ctrl-C again to stop now")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)
