"""Automatic resume checkpoints: how often, and which to keep.

A run writes a resume checkpoint at least ``TrainConfig.autosave`` seconds after the previous save (of
any kind), and never sooner than 20 times the last save's duration, so that saving costs at most about 5%
of the training time whatever the model's size (a 1.2M-parameter model saves in milliseconds and is
saved every minute; a model that takes 30 s to save is saved every 10 minutes). Such a checkpoint is
marked (:data:`MARK`) and replaced by the next save: a run keeps its ``--checkpoint-every``
checkpoints, its final one, and at most one automatic checkpoint, removed when the run finishes.
``TrainConfig.keep_last = N`` keeps only the latest N of the kept checkpoints (:func:`prune_kept`).
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from gpas_probe.checkpoints import step_checkpoints
from gpas_probe.distributed import DistContext

log = logging.getLogger(__name__)

MARK = "autosave"  # a file in an automatic checkpoint's folder
COST_FACTOR = 20  # never save sooner than this many times the last save's duration
DIST_CHECK_EVERY = 16  # under torchrun, rank 0 decides every this many steps (one broadcast)


class Autosave:
    """Says when the next automatic checkpoint is due; told when a save happened and how long it took."""

    def __init__(self, seconds: float, ctx: DistContext) -> None:
        self.seconds = seconds
        self.ctx = ctx
        self.last = time.monotonic()
        self.cost = 0.0

    @property
    def interval(self) -> float:
        return max(self.seconds, COST_FACTOR * self.cost)

    def due(self, step: int) -> bool:
        if not self.seconds:
            return False
        if not self.ctx.distributed:
            return time.monotonic() - self.last >= self.interval
        if step % DIST_CHECK_EVERY:
            return False
        return bool(self.ctx.on_main(lambda: time.monotonic() - self.last >= self.interval))

    def saved(self, started: float) -> None:
        """A save that began at ``started`` (``time.monotonic()``) just ended."""
        self.last = time.monotonic()
        self.cost = self.last - started


def is_autosave(ckpt: Path) -> bool:
    return (ckpt / MARK).is_file()


def prune_kept(run_dir: Path, keep_last: int) -> None:
    """Remove all but the latest ``keep_last`` checkpoints that are not automatic (0: keep them all)."""
    if keep_last <= 0:
        return
    kept = [ckpt for ckpt in step_checkpoints(run_dir) if not is_autosave(ckpt)]
    for ckpt in kept[:-keep_last]:
        shutil.rmtree(ckpt, ignore_errors=True)
        log.info("removed checkpoint %s (--keep-last %d)", ckpt, keep_last)


def prune_autosaves(run_dir: Path, keep: Path | None = None) -> None:
    """Remove the run's automatic checkpoints but ``keep``."""
    for ckpt in step_checkpoints(run_dir):
        if ckpt != keep and is_autosave(ckpt):
            shutil.rmtree(ckpt, ignore_errors=True)
            log.debug("removed automatic checkpoint %s", ckpt)
