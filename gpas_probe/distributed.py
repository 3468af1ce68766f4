"""Data-parallel training under ``torchrun``: DDP or FSDP2 (``fully_shard``); gloo on CPU, NCCL on CUDA.

Launch::

    torchrun --nproc_per_node 2 -m gpas_probe.cli.main train --dist ddp ...     # or --dist fsdp

Each of the ``W`` ranks trains on its own slice of one global batch of ``batch_size * W`` rows
(:meth:`gpas_probe.data.Batches.train`), so a run on ``W`` processes computes what one process
computes with ``batch_size * W`` rows (to float rounding): every rank's loss is the mean over the
same number of tokens, and DDP and FSDP average the gradients, so the mean of the ranks' losses is
the global mean.

What is reduced, and how:

- the reported loss and the validation loss: the mean over ranks (one all-reduce per step);
- probe statistics: sums (SUM) and maxima (MAX) of every rank, flattened into one tensor each, are
  all-reduced once per recorded step before the single copy to the host
  (:meth:`DistContext.all_reduce_stats`); parameter statistics of FSDP's sharded parameters are
  partial sums of the local shards and are summed the same way; replicated values (DDP gradients
  after DDP's all-reduce, GPAS gates) are taken as they are;
- activation gradients (the probes' ``bwd`` rows) are scaled by ``1 / W`` before their statistics
  are taken: each rank's loss is its own mean and the global loss the mean of those;
- parameter gradients are read after the backward pass, once DDP/FSDP have reduced them (not in
  post-accumulate-grad hooks, which see a rank's own gradient), and before clipping; the global
  gradient norm is the one ``clip_grad_norm_`` computes over the full (DTensor) gradients;
- FSDP: the scalar GPAS gates cannot be sharded (``fully_shard`` refuses 0-d parameters), so they
  are left out of sharding (``ignored_params``), kept replicated, and their gradients are averaged
  over ranks here (:meth:`DistContext.average_replicated_grads`) before anything reads them.

Errors: bad input is found on every rank at the same point (checks of rank 0 alone, such as the
run folder's, are broadcast by :meth:`DistContext.on_main`; per-rank checks are agreed on by
:meth:`DistContext.agree`), so every rank stops together with the same error, which rank 0 reports.

Only rank 0 writes (parquet chunks, ``run.json``, checkpoints). Checkpoints are gathered into a full
state dict (:func:`full_model_state`) and saved in the single-process format, so a checkpoint saved
from FSDP loads in one process, and the optimizer state is stored in ``torch.optim``'s own
(index-keyed) format whatever the mode, so a run may be resumed under any mode with the same number
of processes.
"""

from __future__ import annotations

import gc
import inspect
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

log = logging.getLogger(__name__)

DIST_MODES = ("none", "ddp", "fsdp")
#: The environment ``torchrun`` gives every process it starts (read to join its process group).
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
T = TypeVar("T")
E = TypeVar("E", bound=BaseException)


def resolve_device(device: str) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        d = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if d.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}; use auto, cpu, cuda or cuda:N")
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but no CUDA device is available")
    return d


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


# -- models -----------------------------------------------------------------------------------------
def replicated_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters FSDP leaves unsharded: the scalar GPAS gates."""
    from gpas_probe.gpas import gate_parameters

    return list(gate_parameters(model))


def wrap_model(model: nn.Module, ctx: DistContext) -> nn.Module:
    """The module to run forward/backward through: DDP around ``model``, or ``model`` itself sharded
    in place with FSDP2 (one unit per decoder layer plus the root), or ``model`` unchanged."""
    if ctx.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    if ctx.mode == "fsdp":
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:  # torch < 2.6
            from torch.distributed._composable.fsdp import fully_shard
        ignored = set(replicated_parameters(model))
        if ignored and "ignored_params" not in inspect.signature(fully_shard).parameters:
            raise ValueError(f"--dist fsdp with GPAS gates needs fully_shard(ignored_params=...), which torch "
                             f"{torch.__version__} lacks; use --dist ddp or a newer torch")
        kw = {"ignored_params": ignored} if ignored else {}
        for block in getattr(model, "layers", []):
            fully_shard(block, **kw)
        fully_shard(model, **kw)
        return model
    return model


def param_names(model: nn.Module) -> dict[int, str]:
    """id(parameter) -> its first fully qualified name (a shared parameter has several)."""
    return {id(p): name for name, p in model.named_parameters()}


def full_model_state(model: nn.Module, ctx: DistContext) -> dict[str, torch.Tensor] | None:
    """FSDP: the full (unsharded) state dict on CPU, on rank 0 (collective: every rank calls it).
    Other modes: None (the parameters are whole already)."""
    if ctx.mode != "fsdp":
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, ctx: DistContext) -> dict[str, Any]:
    """The optimizer state in ``torch.optim``'s index-keyed format (FSDP: gathered, valid on rank 0;
    collective)."""
    if ctx.mode != "fsdp":
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    full = get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not ctx.is_main:
        return {}
    index: dict[str, int] = {}
    groups = []
    for group in full["param_groups"]:
        ids = []
        for name in group["params"]:
            index.setdefault(name, len(index))
            ids.append(index[name])
        groups.append({**group, "params": ids})
    return {"state": {index[name]: s for name, s in full["state"].items()}, "param_groups": groups}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
                         ctx: DistContext) -> None:
    """Load an index-keyed optimizer state (every rank holds the full one); FSDP shards it."""
    if ctx.mode != "fsdp":
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = param_names(model)
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    saved = [i for g in state["param_groups"] for i in g["params"]]
    if len(saved) != len(order):
        raise ValueError(f"the saved optimizer state covers {len(saved)} parameters, the model has {len(order)}")
    name_of = dict(zip(saved, order, strict=True))
    groups = [{**g, "params": [name_of[i] for i in g["params"]]} for g in state["param_groups"]]
    fqn_state = {"state": {name_of[int(i)]: s for i, s in state["state"].items()}, "param_groups": groups}
    set_optimizer_state_dict(model, optimizer, fqn_state, options=StateDictOptions(full_state_dict=True))


def clip_grad_norm(params: list[nn.Parameter], max_norm: float, ctx: DistContext) -> float:
    """The global gradient norm before clipping (over full tensors under FSDP), clipping to ``max_norm``."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    full = getattr(norm, "full_tensor", None)
    return float(full() if callable(full) else norm)


def key_checksum(keys: Iterable[Any]) -> float:
    """A float (exact in float64) that differs when ranks would reduce different statistics."""
    return float(zlib.crc32("|".join(repr(k) for k in keys).encode()))
