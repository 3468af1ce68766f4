"""Statistics kept on the device as *sufficient statistics*: sums and maxima, or the latest value.

Several forward/backward passes in one step (gradient accumulation) add up, and a distributed run
all-reduces the sums (SUM) and maxima (MAX) of every rank, each flattened into one tensor, before the
one transfer to the host that :meth:`Accumulator.collect` makes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable

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
