"""One recorded step: the hooks it owns and the statistics they accumulate on the device.

A :class:`Recording` exists only while a step is armed. Every hook it registers (module forward
hooks, tensor gradient hooks, parameter post-accumulate-grad hooks) is kept as a handle and removed
by :meth:`Recording.close`; between recorded steps the model carries no hook at all, so an
unrecorded step runs exactly the code it runs without probes. A hook reduces its tensor to per-token
rows (:class:`~gpas_probe.probes.tokens.TokenRows`); when a pass ends (the next forward after a
backward, another shape or token mask, or :meth:`Recording.end_pass`) the families reduce the rows
of the whole pass at once (:meth:`Recording.on_pass_end`). Statistics accumulate in an
:class:`~gpas_probe.probes.accumulator.Accumulator`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from gpas_probe.distributed import is_sharded, local
from gpas_probe.probes.accumulator import SAME, SUM, Accumulator, Key, stat_dtype
from gpas_probe.probes.driver import Driver
from gpas_probe.probes.tokens import TokenRows


class Recording:
    """The hooks and accumulated statistics of one armed step.

    ``driver`` (:class:`~gpas_probe.probes.driver.Driver`) says how: with ``reads_grads_at_end``,
    parameter gradients are read when :meth:`capture_grads` is called after the backward pass instead
    of by post-accumulate-grad hooks; its ``grad_scale`` is the factor the statistics of activation
    gradients are reported with, which the families apply to their results.
    """

    def __init__(self, step: int, driver: Driver | None = None, skip_first_position: bool = False,
                 exclude: torch.Tensor | None = None, tokens: torch.Tensor | None = None) -> None:
        self.step = step
        self.tokens = tokens  # (B, T) input ids, when the driver gives them
        self.driver = driver or Driver()
        self.acc = Accumulator()
        self.state: dict[Hashable, Any] = {}  # per-step scratch of the statistic families
        self.grad_scale = self.driver.grad_scale
        self._handles: list[RemovableHandle] = []
        self._grad_kinds: dict[int, set[str]] = {}
        self._grad_index: dict[int, int] = {}  # id(param) -> the order it was first watched in
        self._watched: list[tuple[nn.Parameter, set[str], int]] = []
        self._at_backward_end = self.driver.reads_grads_at_end
        self._captured = False
        self._skip_first = skip_first_position
        self._exclude = exclude
        self._keep_cache: dict[tuple[int, int, torch.device], torch.Tensor | None] = {}
        self._scratch: dict[tuple[tuple[int, ...], torch.dtype, torch.device], torch.Tensor] = {}
        self.locate_forward = False  # forward rows keep where their largest |x| sits (the outliers family)
        self.rows: TokenRows | None = None
        self._pass_end: list[Callable[[TokenRows], None]] = []
        self._forward_fns: dict[nn.Module, list[Callable[[torch.Tensor], None]]] = {}
        self._grad_fns: dict[int, tuple[weakref.ref, list[Callable[[torch.Tensor], None]]]] = {}
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

    def token_ids(self, batch: int, seq: int, device: torch.device) -> torch.Tensor | None:
        """The input ids of a pass's (batch, seq) positions on ``device``, when the driver gave them (read
        when the pass's first tensor arrives: the driver gives the next pass's before its forward)."""
        ids = self.tokens
        if ids is None or tuple(ids.shape) != (batch, seq):
            return None
        return ids.to(device)

    def scratch(self, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A buffer of ``like``'s shape and device (and dtype, unless given), reused by every statistic of
        this step that needs an activation-sized temporary (hooks run one at a time): no allocation per
        statistic."""
        key = (tuple(like.shape), dtype or like.dtype, like.device)
        buf = self._scratch.get(key)
        if buf is None:
            buf = self._scratch[key] = torch.empty(key[0], dtype=key[1], device=key[2])
        return buf

    # -- per-token rows of a pass ---------------------------------------------------------------
    def on_pass_end(self, fn: Callable[[TokenRows], None]) -> None:
        """Call ``fn(rows)`` with the rows of each pass when it ends (a family reduces its sites there)."""
        self._pass_end.append(fn)

    def token_row(self, x: torch.Tensor, forward: bool) -> int:
        """The row of ``x`` (B, T, hidden) in this pass's :class:`TokenRows` (``forward``: an activation,
        else a gradient). A forward tensor after a backward one starts a new pass."""
        keep = self.keep(x)
        rows = self.rows
        if rows is not None and (not rows.accepts(x, keep) or (forward and rows.backward_seen)):
            self.end_pass()
            rows = None
        if rows is None:
            rows = self.rows = TokenRows(x, keep, len(self._forward_fns), self.locate_forward,
                                         self.token_ids(x.shape[0], x.shape[1], x.device))
        rows.backward_seen |= not forward
        known = rows.known(x)  # the families of one hook point ask for the same tensor in turn
        return known if known is not None else rows.row(x, self.scratch(x, rows.dtype), forward)

    def pair_row(self, a: torch.Tensor, b: torch.Tensor) -> int:
        """The per-token dot products of ``a`` and ``b``, two tensors of this pass with rows already."""
        assert self.rows is not None
        return self.rows.pair(a, b, self.scratch(a, self.rows.dtype))

    def end_pass(self) -> None:
        """Hand the rows of the pass to the families (:meth:`on_pass_end`); the next tensor starts new rows."""
        rows, self.rows = self.rows, None
        if rows is not None and rows.n:
            for fn in self._pass_end:
                fn(rows)

    # -- hooks ---------------------------------------------------------------------------------
    def on_forward(self, module: nn.Module, fn: Callable[[torch.Tensor], None]) -> None:
        """Call ``fn(output)`` after ``module``'s forward when gradients are enabled (training passes;
        evaluation under ``torch.no_grad`` is not recorded). One hook per module, whatever the number of
        callbacks: they run in the order they were given."""
        fns = self._forward_fns.get(module)
        if fns is None:
            fns = self._forward_fns[module] = []

            def hook(_module: nn.Module, _args: Any, output: Any, fns: list = fns) -> None:
                if torch.is_grad_enabled() and isinstance(output, torch.Tensor):
                    for f in fns:
                        f(output)

            self._handles.append(module.register_forward_hook(hook))
        fns.append(fn)

    def on_grad(self, tensor: torch.Tensor, fn: Callable[[torch.Tensor], None]) -> None:
        """Call ``fn(grad)`` with the gradient of the loss w.r.t. ``tensor`` (the gradient is not changed); one
        hook per tensor, whatever the number of callbacks: they run in the order they were given."""
        entry = self._grad_fns.get(id(tensor))
        if entry is not None and entry[0]() is tensor:
            entry[1].append(fn)
            return
        fns = [fn]
        self._grad_fns[id(tensor)] = (weakref.ref(tensor), fns)

        def hook(grad: torch.Tensor) -> None:
            for f in fns:
                f(grad)

        self._handles.append(tensor.register_hook(hook))

    def watch_grad(self, param: nn.Parameter, kind: str) -> Key:
        """Record ``param``'s accumulated gradient before any clipping and return the key it is kept
        under: ``kind`` "sq" keeps its squared norm under ``("grad_sq", i)``, "value" a copy of a
        scalar gradient under ``("grad", i)``, ``i`` being the order the parameter was first watched
        in (the same on every rank). One post-accumulate-grad hook per parameter, whatever the kinds
        (or none when the driver reads gradients at the backward's end: :meth:`capture_grads` reads
        them all); the latest accumulation wins, so gradient accumulation records the full step's
        gradient.
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
        """Read the watched gradients now (the driver reads them at the backward's end; call after it):
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
            for reduce in (SAME, SUM):  # one block per kind: replicated gradients, and shards to sum
                picked = [j for j, item in enumerate(items) if item[2] == reduce]
                if picked:
                    values = squares if len(picked) == len(items) else squares[picked]
                    self.acc.set_block(("grad_sq", grads[0].dtype, grads[0].device, reduce),
                                       [("grad_sq", items[j][0]) for j in picked], values, reduce)

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
        self._forward_fns.clear()
        self._grad_fns.clear()
        self.state.clear()
        self.rows = None
        self._pass_end.clear()
        self.closed = True

    @property
    def num_hooks(self) -> int:
        return len(self._handles)
