"""This process's place in a run (:class:`DistContext`): joining ``torchrun``'s process group, the few
collectives training needs, and errors that every rank raises together (see :mod:`gpas_probe.distributed`)."""

from __future__ import annotations

import gc
import logging
import os
import traceback
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from gpas_probe.devices import resolve_device

log = logging.getLogger(__name__)

DIST_MODES = ("none", "ddp", "fsdp")
#: The environment ``torchrun`` gives every process it starts (read to join its process group).
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
T = TypeVar("T")
E = TypeVar("E", bound=BaseException)

def torchrun_world_size() -> int | None:
    """The number of processes of the ``torchrun`` launch this process belongs to, or None."""
    if all(k in os.environ for k in TORCHRUN_ENV):
        return int(os.environ["WORLD_SIZE"])
    return None


_PLAIN = (torch.Tensor, torch.nn.Parameter)  # the common case, answered without attribute lookups


def is_sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is a DTensor holding a shard (FSDP2's parameters and gradients)."""
    if type(t) in _PLAIN:
        return False
    placements = getattr(t, "placements", None)
    return placements is not None and any(p.is_shard() for p in placements)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (the tensor itself otherwise)."""
    if type(t) in _PLAIN:
        return t
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


@dataclass
class DistContext:
    """This process's place in a (possibly single-process) run.

    ``mode`` is ``none``, ``ddp`` or ``fsdp``; ``owns_group`` says whether :func:`init_distributed`
    created the process group (and :meth:`close` destroys it).
    """

    mode: str = "none"
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False

    @property
    def distributed(self) -> bool:
        return self.mode != "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- collectives ------------------------------------------------------------------------------
    def _comm(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device) if t.device != self.device else t

    def all_reduce_stats(self, sums: torch.Tensor, maxima: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """SUM-reduce ``sums`` and MAX-reduce ``maxima`` over ranks (two collectives); returns them."""
        if self.world == 1:
            return sums, maxima
        s, m = self._comm(sums), self._comm(maxima)
        dist.all_reduce(s, op=dist.ReduceOp.SUM)
        dist.all_reduce(m, op=dist.ReduceOp.MAX)
        return s, m

    def mean(self, value: torch.Tensor | float) -> float:
        """The mean over ranks of a scalar (every rank gets it)."""
        if self.world == 1:
            return float(value)
        t = torch.as_tensor(value, dtype=torch.float64).detach().reshape(1).clone()
        t = self._comm(t)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t.item()) / self.world

    def average_replicated_grads(self, params: Iterable[nn.Parameter]) -> None:
        """Average over ranks the gradients of parameters that neither DDP nor FSDP reduces (FSDP's
        ignored GPAS gates), in one collective."""
        grads = [p.grad for p in params if p.grad is not None]
        if self.world == 1 or not grads:
            return
        flat = self._comm(torch.cat([g.detach().reshape(-1).to(torch.float64) for g in grads]))
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].reshape(g.shape).to(g.dtype))
            offset += g.numel()

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only and give every rank its result; if it raised, every rank raises
        the same error (followers' copies are marked ``quiet``: rank 0 reports it)."""
        if self.world == 1:
            return fn()
        box: list[Any] = [None]
        if self.is_main:
            try:
                box[0] = ("ok", fn())
            except Exception as e:
                dist.broadcast_object_list([("error", _describe(e))], src=0)
                raise mark_shared(e) from None
        dist.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if kind == "error":
            raise _rebuild(value, origin=0)
        return value

    def agree(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on every rank; if it raised on any, every rank raises (rank 0's error, or the
        first failing rank's, named); followers' copies are marked ``quiet``."""
        if self.world == 1:
            return fn()
        mine: tuple[str, str] | None = None
        result: Any = None
        error: Exception | None = None
        try:
            result = fn()
        except Exception as e:
            error, mine = e, _describe(e)
        everyone: list[Any] = [None] * self.world
        dist.all_gather_object(everyone, mine)
        failed = [(r, d) for r, d in enumerate(everyone) if d is not None]
        if not failed:
            return result
        origin, described = failed[0]
        if error is not None and origin == self.rank:
            raise mark_shared(mark_quiet(error) if not self.is_main else error)
        raise _rebuild(described, origin=origin, quiet=not self.is_main)

    def close(self) -> None:
        """Destroy the process group this context created, once every rank is done with it.

        Modules that hold the group (DDP's reducer, FSDP's state) should be gone by then: one that
        outlives the group can abort the process at exit, so unreachable ones are collected here.
        """
        if self.owns_group and dist.is_initialized():
            gc.collect()
            dist.barrier()
            dist.destroy_process_group()
            self.owns_group = False


def mark_quiet(error: E) -> E:
    """Mark an error that rank 0 reports as well, so that other ranks stay silent about it."""
    error.quiet = True  # type: ignore[attr-defined]
    return error


def mark_shared(error: E) -> E:
    """Mark an error that every rank raises at the same point (the process group can still be shut
    down in order, see :func:`distributed`)."""
    error.shared = True  # type: ignore[attr-defined]
    return error


def _describe(e: Exception) -> tuple[str, str]:
    return type(e).__name__, str(e)


_REBUILDABLE: dict[str, type[Exception]] = {c.__name__: c for c in (
    ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError,
    FloatingPointError, OSError)}


def _rebuild(described: tuple[str, str], origin: int, quiet: bool = True) -> Exception:
    name, message = described
    cls = _REBUILDABLE.get(name, RuntimeError)
    err = mark_shared(cls(message if origin == 0 else f"[rank {origin}] {message}"))
    return mark_quiet(err) if quiet else err


def init_distributed(mode: str = "none", device: str = "auto") -> DistContext:
    """Join (or create) the process group of a ``torchrun`` launch for ``mode`` ``ddp``/``fsdp``.

    ``none`` is a single process. On CUDA each rank takes ``cuda:LOCAL_RANK`` and NCCL, on CPU gloo.
    An existing process group (created by the caller) is used as it is.
    """
    if mode not in DIST_MODES:
        raise ValueError(f"unknown --dist {mode!r}; choose from {', '.join(DIST_MODES)}")
    if mode == "none":
        return DistContext(device=resolve_device(device))
    if not dist.is_available():
        raise ValueError(f"--dist {mode} needs torch.distributed, which this torch build lacks")
    owns = not dist.is_initialized()
    if owns and torchrun_world_size() is None:
        raise ValueError(f"--dist {mode} needs a torchrun launch, e.g. "
                         f"torchrun --nproc_per_node 2 -m gpas_probe.cli.main train --dist {mode} ...")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    d = resolve_device(device)
    if d.type == "cuda":
        if d.index is not None:
            raise ValueError(f"--device {device} with --dist {mode}: each process takes cuda:LOCAL_RANK; "
                             "pass --device cuda (or auto)")
        d = torch.device("cuda", local_rank)
        torch.cuda.set_device(d)
    if owns:
        backend = "nccl" if d.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=d if d.type == "cuda" else None)
        log.info("joined the %s process group as rank %d of %d", backend, dist.get_rank(), dist.get_world_size())
    return DistContext(mode, dist.get_rank(), dist.get_world_size(), local_rank, d, owns)


@contextmanager
def distributed(mode: str | DistContext = "none", device: str = "auto") -> Iterator[DistContext]:
    """:func:`init_distributed` as a context manager (a given context is used and left open).

    The process group is destroyed after a barrier when the block ends normally or with an error
    every rank raised together (:func:`mark_shared`); after any other error it is left to the
    process's exit, as another rank may still be inside a collective.
    """
    if isinstance(mode, DistContext):
        yield mode
        return
    ctx = init_distributed(mode, device)
    try:
        yield ctx
    except BaseException as e:
        if getattr(e, "shared", False):
            traceback.clear_frames(e.__traceback__)  # let go of the modules the frames hold
            ctx.close()
        raise
    ctx.close()


def check_launch(mode: str) -> None:
    """Refuse a ``--dist`` mode that does not fit how this process was started: an unknown mode, or
    ``none`` in one of several ``torchrun`` processes (each would train alone into the same folder)."""
    if mode not in DIST_MODES:
        raise ValueError(f"unknown --dist {mode!r}; choose one of {', '.join(DIST_MODES)}")
    world = torchrun_world_size()
    if mode == "none" and world is not None and world > 1:
        raise ValueError(f"this is one of {world} torchrun processes: pass --dist ddp or --dist fsdp "
                         "(with --dist none each would train alone into the same folder)")


def key_checksum(keys: Iterable[Any]) -> float:
    """A float (exact in float64) that differs when ranks would reduce different statistics."""
    return float(zlib.crc32("|".join(repr(k) for k in keys).encode()))
