"""One recorded step: the hooks it owns and the statistics they accumulate on the device.

A :class:`Recording` exists only while a step is armed. Every hook it registers (module forward
hooks, tensor gradient hooks, parameter post-accumulate-grad hooks) is kept as a handle and removed
by :meth:`Recording.close`; between recorded steps the model carries no hook at all, so an
unrecorded step runs exactly the code it runs without probes.

Statistics are kept as *sufficient statistics* (sums and maxima, or the latest value) in an
:class:`Accumulator`. Several forward/backward passes in one step (gradient accumulation) add up,
and a distributed run all-reduces the sums (SUM) and maxima (MAX) of every rank, each flattened into
one tensor, before the one transfer to the host that :meth:`Accumulator.collect` makes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from gpas_probe.distributed import is_sharded, key_checksum, local

Key = tuple[Hashable, ...]
Number = float | int | torch.Tensor


def stat_dtype(t: torch.Tensor) -> torch.dtype:
    """Reductions run in at least float32 (float64 stays float64)."""
    return torch.promote_types(t.dtype, torch.float32)


#: How a value combines over the ranks of a distributed run: summed, maximised, or taken as it is
#: (a value every rank holds the same, such as a replicated parameter's norm).
SUM, MAX, SAME = "sum", "max", "same"
#: ``all_reduce(sums, maxima) -> (sums, maxima)``: SUM- and MAX-reduces two flat float64 tensors.
AllReduce = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class Accumulator:
    """Named scalars accumulated on the device; values may also be plain host numbers.

    :meth:`add` sums and :meth:`max` maximises (over passes, and over ranks); :meth:`set` keeps the
    latest value, which ranks share as it is unless ``reduce`` says SUM or MAX (a partial sum over a
    rank's shard of a parameter is set with ``reduce=SUM``).
    """

    def __init__(self) -> None:
        self._values: dict[Key, Number] = {}
        self._reduce: dict[Key, str] = {}

    def add(self, key: Key, value: Number) -> None:
        old = self._values.get(key)
        self._values[key] = value if old is None else old + value
        self._reduce[key] = SUM

    def max(self, key: Key, value: Number) -> None:
        old = self._values.get(key)
        if old is None:
            self._values[key] = value
        elif isinstance(old, torch.Tensor) or isinstance(value, torch.Tensor):
            self._values[key] = torch.maximum(torch.as_tensor(old), torch.as_tensor(value))
        else:
            self._values[key] = max(old, value)
        self._reduce[key] = MAX

    def set(self, key: Key, value: Number, reduce: str = SAME) -> None:
        self._values[key] = value
        self._reduce[key] = reduce

    def __contains__(self, key: Key) -> bool:
        return key in self._values

    def collect(self, all_reduce: AllReduce | None = None) -> dict[Key, float]:
        """Every value as a Python float: accelerator tensors are stacked and copied once per device.

        With ``all_reduce`` (a distributed run), the SUM values and the MAX values are each
        flattened into one float64 tensor, reduced over ranks in one call, then copied to the host;
        keys must be the same on every rank (they are checked with a checksum carried along).
        """
        if all_reduce is not None:
            return self._collect_reduced(all_reduce)
        out: dict[Key, float] = {}
        by_device: dict[torch.device, list[tuple[Key, torch.Tensor]]] = {}
        for key, v in self._values.items():
            if isinstance(v, torch.Tensor) and v.device.type != "cpu":
                by_device.setdefault(v.device, []).append((key, v))
            else:  # a host number, or a CPU tensor: reading it directly beats stacking on the host
                out[key] = float(v)
        for items in by_device.values():
            dtype = torch.float64 if any(t.dtype == torch.float64 for _, t in items) else torch.float32
            flat = torch.stack([t if t.dim() == 0 and t.dtype == dtype else t.reshape(()).to(dtype)
                                for _, t in items]).detach().cpu().tolist()
            out.update((key, value) for (key, _), value in zip(items, flat, strict=True))
        return out

    def _collect_reduced(self, all_reduce: AllReduce) -> dict[Key, float]:
        keys = sorted(self._values, key=repr)  # the same order on every rank
        device = next((v.device for v in self._values.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))
        groups = {kind: [k for k in keys if self._reduce[k] == kind] for kind in (SUM, MAX, SAME)}
        check = key_checksum((k, self._reduce[k]) for k in keys)
        flat = {kind: self._flat([self._values[k] for k in ks], device) for kind, ks in groups.items()}
        # a NaN must survive MAX whatever the backend's max does with it: count NaNs with the sums
        n_sum, n_max, nan = len(groups[SUM]), len(groups[MAX]), flat[MAX].isnan()
        maxima = torch.cat([flat[MAX].masked_fill(nan, math.inf),
                            torch.tensor([check, -check], dtype=torch.float64, device=device)])
        sums, maxima = all_reduce(torch.cat([flat[SUM], nan.to(torch.float64)]), maxima)
        maxima = torch.cat([maxima[:n_max].masked_fill(sums[n_sum:] > 0, math.nan), maxima[n_max:]])
        every = torch.cat([sums[:n_sum], maxima, flat[SAME].to(sums.device)]).cpu().tolist()  # one copy to the host
        checks = every[n_sum + n_max:n_sum + n_max + 2]
        if checks[0] != -checks[1]:
            raise RuntimeError("ranks recorded different probe statistics for the same step; every rank must "
                               "run the same model and probe configuration")
        host = {SUM: every[:n_sum], MAX: every[n_sum:n_sum + n_max], SAME: every[n_sum + n_max + 2:]}
        return {k: v for kind, ks in groups.items() for k, v in zip(ks, host[kind], strict=True)}

    @staticmethod
    def _flat(values: list[Number], device: torch.device) -> torch.Tensor:
        """One float64 tensor on ``device``: device values stacked, host numbers copied in one go."""
        out = torch.empty(len(values), dtype=torch.float64, device=device)
        on_device = [i for i, v in enumerate(values) if isinstance(v, torch.Tensor)]
        on_host = [i for i, v in enumerate(values) if not isinstance(v, torch.Tensor)]
        if on_device:
            out[on_device] = torch.stack([values[i].detach().reshape(()).to(device=device, dtype=torch.float64)
                                          for i in on_device])
        if on_host:
            out[on_host] = torch.tensor([float(values[i]) for i in on_host], dtype=torch.float64).to(device)
        return out


class Recording:
    """The hooks and accumulated statistics of one armed step.

    ``grads_at_backward_end``: parameter gradients are read when :meth:`capture_grads` is called
    after the backward pass (a distributed run, where DDP/FSDP reduce the gradients only at the end
    of the backward) instead of by post-accumulate-grad hooks. ``grad_scale`` is the factor the
    statistics of activation gradients are reported with (``1 / world`` in a distributed run: each
    rank's loss is its own mean, the global loss their mean); families apply it to their results.
    """

    def __init__(self, step: int, skip_first_position: bool = False, exclude: torch.Tensor | None = None, *,
                 grads_at_backward_end: bool = False, grad_scale: float = 1.0) -> None:
        self.step = step
        self.acc = Accumulator()
        self.state: dict[Hashable, Any] = {}  # per-step scratch of the statistic families
        self.grad_scale = grad_scale
        self._handles: list[RemovableHandle] = []
        self._grad_kinds: dict[int, set[str]] = {}
        self._grad_index: dict[int, int] = {}  # id(param) -> the order it was first watched in
        self._watched: list[tuple[nn.Parameter, set[str], int]] = []
        self._at_backward_end = grads_at_backward_end
        self._captured = False
        self._skip_first = skip_first_position
        self._exclude = exclude
        self._keep_cache: dict[tuple[int, int, torch.device], torch.Tensor | None] = {}
        self._scratch: dict[tuple[tuple[int, ...], torch.dtype, torch.device], torch.Tensor] = {}
        self.closed = False

    # -- token masks ---------------------------------------------------------------------------
    def set_exclude(self, exclude: torch.Tensor | None) -> None:
        self._exclude = exclude
        self._keep_cache.clear()

    def keep(self, x: torch.Tensor) -> torch.Tensor | None:
        """The (B, T) positions of ``x`` (B, T, hidden) that statistics include; None = all."""
        if self._exclude is None and not self._skip_first:
            return None
        b, t = x.shape[0], x.shape[1]
        cache_key = (b, t, x.device)
        if cache_key not in self._keep_cache:
            if self._exclude is None:
                keep = torch.ones(b, t, dtype=torch.bool, device=x.device)
            else:
                if tuple(self._exclude.shape) != (b, t):
                    raise ValueError(f"token mask of shape {tuple(self._exclude.shape)} does not match "
                                     f"activations of shape {tuple(x.shape)}")
                keep = ~self._exclude.to(device=x.device, dtype=torch.bool)
            if self._skip_first:
                keep = keep.clone()
                keep[:, 0] = False
            self._keep_cache[cache_key] = keep
        return self._keep_cache[cache_key]

    def scratch(self, like: torch.Tensor) -> torch.Tensor:
        """A buffer of ``like``'s shape, dtype and device, reused by every statistic of this step that
        needs an activation-sized temporary (hooks run one at a time): no allocation per statistic."""
        key = (tuple(like.shape), like.dtype, like.device)
        buf = self._scratch.get(key)
        if buf is None:
            buf = self._scratch[key] = torch.empty(like.shape, dtype=like.dtype, device=like.device)
        return buf

    # -- hooks ---------------------------------------------------------------------------------
    def on_forward(self, module: nn.Module, fn: Callable[[torch.Tensor], None]) -> None:
        """Call ``fn(output)`` after ``module``'s forward when gradients are enabled (training passes;
        evaluation under ``torch.no_grad`` is not recorded)."""

        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            if torch.is_grad_enabled() and isinstance(output, torch.Tensor):
                fn(output)

        self._handles.append(module.register_forward_hook(hook))

    def on_grad(self, tensor: torch.Tensor, fn: Callable[[torch.Tensor], None]) -> None:
        """Call ``fn(grad)`` with the gradient of the loss w.r.t. ``tensor`` (the gradient is not changed)."""

        def hook(grad: torch.Tensor) -> None:
            fn(grad)

        self._handles.append(tensor.register_hook(hook))

    def watch_grad(self, param: nn.Parameter, kind: str) -> Key:
        """Record ``param``'s accumulated gradient before any clipping and return the key it is kept
        under: ``kind`` "sq" keeps its squared norm under ``("grad_sq", i)``, "value" a copy of a
        scalar gradient under ``("grad", i)``, ``i`` being the order the parameter was first watched
        in (the same on every rank). One post-accumulate-grad hook per parameter, whatever the kinds
        (or none with ``grads_at_backward_end``: :meth:`capture_grads` reads them all); the latest
        accumulation wins, so gradient accumulation records the full step's gradient.
        A sharded (FSDP) gradient contributes its local shard's squared norm, summed over ranks."""
        kinds = self._grad_kinds.get(id(param))
        if kinds is None:
            kinds = self._grad_kinds[id(param)] = set()
            self._grad_index[id(param)] = len(self._grad_index)
            if self._at_backward_end:
                self._watched.append((param, kinds, self._grad_index[id(param)]))
            else:
                self._handles.append(param.register_post_accumulate_grad_hook(
                    lambda p, kinds=kinds: self._grad_hook(p, kinds)))
        kinds.add(kind)
        return ("grad_sq" if kind == "sq" else "grad", self._grad_index[id(param)])

    @property
    def grads_pending(self) -> bool:
        """Gradients are watched for :meth:`capture_grads`, which has not been called."""
        return bool(self._watched) and not self._captured

    @torch.no_grad()
    def capture_grads(self) -> None:
        """Read the watched gradients now (``grads_at_backward_end``; call after the backward pass):
        the squared norms of all of them in one fused norm per dtype and device, not one per parameter."""
        self._captured = True
        groups: dict[tuple[torch.dtype, torch.device], list[tuple[int, torch.Tensor, str]]] = {}
        for p, kinds, i in self._watched:
            g = p.grad
            if g is None:
                continue
            reduce = SUM if is_sharded(g) else SAME
            g = local(g)
            if "sq" in kinds:
                groups.setdefault((g.dtype, g.device), []).append((i, g, reduce))
            if "value" in kinds:
                self._grad_value(i, g, reduce)
        for items in groups.values():
            grads = [g for _, g, _ in items]
            squares = torch.stack(torch._foreach_norm(grads, 2, dtype=stat_dtype(grads[0]))).square()
            for (i, _, reduce), sq in zip(items, squares.unbind(), strict=True):
                self.acc.set(("grad_sq", i), sq, reduce)

    def _grad_hook(self, p: torch.Tensor, kinds: set[str]) -> None:
        g = p.grad
        if g is None:
            return
        reduce = SUM if is_sharded(g) else SAME
        g = local(g).detach()
        i = self._grad_index[id(p)]
        if "sq" in kinds:
            self.acc.set(("grad_sq", i), torch.linalg.vector_norm(g, dtype=stat_dtype(g)).square(), reduce)
        if "value" in kinds:
            self._grad_value(i, g, reduce)

    def _grad_value(self, i: int, g: torch.Tensor, reduce: str) -> None:
        # a copy (clipping edits .grad in place)
        self.acc.set(("grad", i), g.detach().to(stat_dtype(g)).reshape(-1).sum(), reduce)

    def close(self) -> None:
        """Remove every hook this recording registered (idempotent)."""
        for h in reversed(self._handles):
            h.remove()
        self._handles.clear()
        self._grad_kinds.clear()
        self._watched.clear()
        self._keep_cache.clear()
        self._scratch.clear()
        self.state.clear()
        self.closed = True

    @property
    def num_hooks(self) -> int:
        return len(self._handles)
