"""Statistics kept on the device as *sufficient statistics*: sums and maxima, or the latest value.

Several forward/backward passes in one step (gradient accumulation) add up, and a distributed run
all-reduces the sums (SUM) and maxima (MAX) of every rank, each flattened into one tensor, before the
one transfer to the host that :meth:`Accumulator.collect` makes.

Values come one key at a time (:meth:`Accumulator.add`, ``max``, ``set``) or as a *block*: one 1-D
tensor holding the values of many keys (:meth:`Accumulator.add_block`), which statistics reduced for
all sites at once produce; a block costs one tensor, not one per key.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from typing import NamedTuple

import torch

from gpas_probe.distributed import key_checksum

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


class Block(NamedTuple):
    """The values of ``keys`` as one 1-D tensor, combined over passes and ranks by ``reduce``."""

    keys: tuple[Key, ...]
    values: torch.Tensor
    reduce: str


def _combine(reduce: str, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    return old + new if reduce == SUM else torch.maximum(old, new) if reduce == MAX else new


class Accumulator:
    """Named scalars accumulated on the device; values may also be plain host numbers.

    :meth:`add` sums and :meth:`max` maximises (over passes, and over ranks); :meth:`set` keeps the
    latest value, which ranks share as it is unless ``reduce`` says SUM or MAX (a partial sum over a
    rank's shard of a parameter is set with ``reduce=SUM``).
    """

    def __init__(self) -> None:
        self._values: dict[Key, Number] = {}
        self._reduce: dict[Key, str] = {}
        self._blocks: dict[Hashable, Block] = {}
        self._spread_names: set[Hashable] = set()  # blocks spread into single values: later passes add there

    def add_block(self, name: Hashable, keys: Sequence[Key], values: torch.Tensor, reduce: str = SUM) -> None:
        """The values of ``keys`` (``values[i]`` for ``keys[i]``, a 1-D tensor), combined with an earlier
        block of the same ``name`` by ``reduce``; a block of other keys under that name is spread into
        single values first, and the name's later values go there too (passes that saw different sites
        still add up)."""
        keys = tuple(keys)
        old = self._blocks.get(name)
        if old is None and name not in self._spread_names:
            self._blocks[name] = Block(keys, values, reduce)
        elif old is not None and old.keys == keys and old.reduce == reduce:
            self._blocks[name] = Block(keys, _combine(reduce, old.values, values), reduce)
        else:
            self._spread(name)
            self._spread_values(keys, values, reduce)

    def set_block(self, name: Hashable, keys: Sequence[Key], values: torch.Tensor, reduce: str = SAME) -> None:
        """:meth:`set` for many keys at once: ``values`` replace what ``name`` held (``reduce`` says how
        ranks combine them, as for :meth:`set`)."""
        keys = tuple(keys)
        old = self._blocks.get(name)
        if old is not None and old.keys != keys:
            self._spread(name)
        for key in keys:
            self._values.pop(key, None)
            self._reduce.pop(key, None)
        self._blocks[name] = Block(keys, values, reduce)

    def argmax_block(self, name: Hashable, keys: Sequence[Key], values: torch.Tensor, payload: torch.Tensor) -> None:
        """:meth:`argmax` for many keys at once: ``values`` (E,) and ``payload`` (E, P); the payload of
        ``keys[i]`` is kept under ``keys[i] + (j,)``."""
        keys = tuple(keys)
        pkeys = tuple(k + (j,) for k in keys for j in range(payload.shape[1]))
        old, old_payload = self._blocks.get(name), self._blocks.get((name, "payload"))
        if old is not None and old_payload is not None and old.keys == keys and old_payload.keys == pkeys:
            payload = torch.where((values > old.values)[:, None], payload, old_payload.values.view(payload.shape))
            values = torch.maximum(old.values, values)
        elif old is not None or name in self._spread_names:
            self._spread(name)
            self._spread((name, "payload"))
            for i, key in enumerate(keys):
                self.argmax(key, values[i], tuple(payload[i].unbind()))
            return
        self._blocks[name] = Block(keys, values, MAX)
        self._blocks[(name, "payload")] = Block(pkeys, payload.reshape(-1), SAME)

    def _spread(self, name: Hashable) -> None:
        self._spread_names.add(name)
        block = self._blocks.pop(name, None)
        if block is not None:
            self._spread_values(block.keys, block.values, block.reduce)

    def _spread_values(self, keys: Sequence[Key], values: torch.Tensor, reduce: str) -> None:
        put = {SUM: self.add, MAX: self.max, SAME: self.set}[reduce]
        for key, value in zip(keys, values.unbind(), strict=True):
            put(key, value)

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

    def argmax(self, key: Key, value: torch.Tensor, payload: tuple[torch.Tensor, ...]) -> None:
        """Keep the largest ``value`` under ``key`` (MAX over passes and ranks) and, under ``key + (i,)``,
        the ``payload`` of the pass that had it (its coordinates, say); chosen on the device, no sync.
        Over ranks the payload is rank 0's (a value every rank holds as it is, like :meth:`set`)."""
        old = self._values.get(key)
        if old is None:
            chosen = payload
            self._values[key] = value
        else:
            take = value > old
            chosen = tuple(torch.where(take, new, self._values[key + (i,)]) for i, new in enumerate(payload))
            self._values[key] = torch.maximum(torch.as_tensor(old), value)
        self._reduce[key] = MAX
        for i, v in enumerate(chosen):
            self.set(key + (i,), v)

    def set(self, key: Key, value: Number, reduce: str = SAME) -> None:
        self._values[key] = value
        self._reduce[key] = reduce

    def _entries(self, ordered: bool) -> list[tuple[tuple[Key, ...], str, torch.Tensor | list[float]]]:
        """Every value as (keys, reduce, 1-D tensor or host numbers): single values, then blocks, each
        in an order every rank shares when ``ordered``."""
        entries: list[tuple[tuple[Key, ...], str, torch.Tensor | list[float]]] = []
        for key in sorted(self._values, key=repr) if ordered else self._values:
            v = self._values[key]
            entries.append(((key,), self._reduce[key], v.detach().reshape(1) if isinstance(v, torch.Tensor)
                            else [float(v)]))
        for name in sorted(self._blocks, key=repr) if ordered else self._blocks:
            block = self._blocks[name]
            entries.append((block.keys, block.reduce, block.values.detach()))
        return entries

    def collect(self, all_reduce: AllReduce | None = None) -> dict[Key, float]:
        """Every value as a Python float: accelerator tensors are stacked and copied once per device.

        With ``all_reduce`` (a distributed run), the SUM values and the MAX values are each
        flattened into one float64 tensor, reduced over ranks in one call, then copied to the host;
        keys must be the same on every rank (they are checked with a checksum carried along).
        """
        if all_reduce is not None:
            return self._collect_reduced(all_reduce)
        out: dict[Key, float] = {}
        by_device: dict[torch.device, list[tuple[tuple[Key, ...], torch.Tensor]]] = {}
        for keys, _, v in self._entries(ordered=False):
            if isinstance(v, list):
                out.update(zip(keys, v, strict=True))
            else:
                by_device.setdefault(v.device, []).append((keys, v))
        for items in by_device.values():
            flat = torch.cat([t.to(torch.float64) for _, t in items]).cpu().tolist()  # one copy per device
            out.update(zip((k for keys, _ in items for k in keys), flat, strict=True))
        return out

    def _collect_reduced(self, all_reduce: AllReduce) -> dict[Key, float]:
        entries = self._entries(ordered=True)  # the same order on every rank
        device = next((v.device for _, _, v in entries if isinstance(v, torch.Tensor)), torch.device("cpu"))
        groups = {kind: [(keys, v) for keys, r, v in entries if r == kind] for kind in (SUM, MAX, SAME)}
        keys = {kind: [k for ks, _ in items for k in ks] for kind, items in groups.items()}
        check = key_checksum((k, kind) for kind in (SUM, MAX, SAME) for k in keys[kind])
        flat = {kind: self._flat([v for _, v in items], device) for kind, items in groups.items()}
        # a NaN must survive MAX whatever the backend's max does with it: count NaNs with the sums
        n_sum, n_max, nan = len(keys[SUM]), len(keys[MAX]), flat[MAX].isnan()
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
        return {k: v for kind in (SUM, MAX, SAME) for k, v in zip(keys[kind], host[kind], strict=True)}

    @staticmethod
    def _flat(values: list[torch.Tensor | list[float]], device: torch.device) -> torch.Tensor:
        """One float64 tensor on ``device``: 1-D device tensors and host numbers, in order."""
        parts = [torch.tensor(v, dtype=torch.float64) if isinstance(v, list) else v for v in values]
        if not parts:
            return torch.empty(0, dtype=torch.float64, device=device)
        return torch.cat([p.to(device=device, dtype=torch.float64) for p in parts])
