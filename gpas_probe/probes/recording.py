"""One recorded step: the hooks it owns and the statistics they accumulate on the device.

A :class:`Recording` exists only while a step is armed. Every hook it registers (module forward
hooks, tensor gradient hooks, parameter post-accumulate-grad hooks) is kept as a handle and removed
by :meth:`Recording.close`; between recorded steps the model carries no hook at all, so an
unrecorded step runs exactly the code it runs without probes.

Statistics are kept as *sufficient statistics* (sums and maxima, or the latest value) in an
:class:`Accumulator`. Several forward/backward passes in one step (gradient accumulation) add up,
and a distributed run can all-reduce the sums (SUM) and maxima (MAX) before the one transfer to the
host that :meth:`Accumulator.collect` makes.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

Key = tuple[Hashable, ...]
Number = float | int | torch.Tensor


def stat_dtype(t: torch.Tensor) -> torch.dtype:
    """Reductions run in at least float32 (float64 stays float64)."""
    return torch.promote_types(t.dtype, torch.float32)


class Accumulator:
    """Named scalars accumulated on the device; values may also be plain host numbers."""

    def __init__(self) -> None:
        self._values: dict[Key, Number] = {}

    def add(self, key: Key, value: Number) -> None:
        old = self._values.get(key)
        self._values[key] = value if old is None else old + value

    def max(self, key: Key, value: Number) -> None:
        old = self._values.get(key)
        if old is None:
            self._values[key] = value
        elif isinstance(old, torch.Tensor) or isinstance(value, torch.Tensor):
            self._values[key] = torch.maximum(torch.as_tensor(old), torch.as_tensor(value))
        else:
            self._values[key] = max(old, value)

    def set(self, key: Key, value: Number) -> None:
        self._values[key] = value

    def __contains__(self, key: Key) -> bool:
        return key in self._values

    def collect(self) -> dict[Key, float]:
        """Every value as a Python float: device tensors are stacked and copied once per device."""
        out: dict[Key, float] = {}
        by_device: dict[torch.device, list[tuple[Key, torch.Tensor]]] = {}
        for key, v in self._values.items():
            if isinstance(v, torch.Tensor):
                by_device.setdefault(v.device, []).append((key, v))
            else:
                out[key] = float(v)
        for items in by_device.values():
            dtype = torch.float64 if any(t.dtype == torch.float64 for _, t in items) else torch.float32
            flat = torch.stack([t.detach().reshape(()).to(dtype) for _, t in items]).cpu().tolist()
            out.update((key, value) for (key, _), value in zip(items, flat, strict=True))
        return out


class Recording:
    """The hooks and accumulated statistics of one armed step."""

    def __init__(self, step: int, skip_first_position: bool = False, exclude: torch.Tensor | None = None) -> None:
        self.step = step
        self.acc = Accumulator()
        self.state: dict[Hashable, Any] = {}  # per-step scratch of the statistic families
        self._handles: list[RemovableHandle] = []
        self._grad_kinds: dict[int, set[str]] = {}
        self._skip_first = skip_first_position
        self._exclude = exclude
        self._keep_cache: dict[tuple[int, int, torch.device], torch.Tensor | None] = {}
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

    def watch_grad(self, param: nn.Parameter, kind: str) -> None:
        """Record ``param``'s accumulated gradient before any clipping: ``kind`` "sq" keeps its squared
        norm under ``("grad_sq", id(param))``, "value" keeps a copy of a scalar gradient under
        ``("grad", id(param))``. One post-accumulate-grad hook per parameter, whatever the kinds;
        the latest accumulation wins, so gradient accumulation records the full step's gradient."""
        kinds = self._grad_kinds.get(id(param))
        if kinds is None:
            kinds = self._grad_kinds[id(param)] = set()
            self._handles.append(param.register_post_accumulate_grad_hook(
                lambda p, kinds=kinds: self._grad_hook(p, kinds)))
        kinds.add(kind)

    def _grad_hook(self, p: torch.Tensor, kinds: set[str]) -> None:
        g = p.grad
        if g is None:
            return
        g = g.detach()
        if "sq" in kinds:
            self.acc.set(("grad_sq", id(p)), g.to(stat_dtype(g)).pow(2).sum())
        if "value" in kinds:
            self.acc.set(("grad", id(p)), g.to(stat_dtype(g)).reshape(()).clone())  # clipping edits .grad in place

    def close(self) -> None:
        """Remove every hook this recording registered (idempotent)."""
        for h in reversed(self._handles):
            h.remove()
        self._handles.clear()
        self._grad_kinds.clear()
        self._keep_cache.clear()
        self.state.clear()
        self.closed = True

    @property
    def num_hooks(self) -> int:
        return len(self._handles)
