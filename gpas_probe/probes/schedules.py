"""When to record: schedules are callables ``step -> bool`` (steps are 1-based).

They combine with ``|``: ``LogSpaced(10) | Every(1000)`` is dense early and regular later.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from gpas_probe.probes.config import ProbeConfig

Schedule = Callable[[int], bool]


class _Combinable:
    def __call__(self, step: int) -> bool:
        raise NotImplementedError

    def __or__(self, other: Schedule) -> AnyOf:
        return AnyOf((self, other))


@dataclass(frozen=True)
class Every(_Combinable):
    """Every ``n``-th step, plus step 1 when ``first`` (the model as initialised, after one update)."""

    n: int
    first: bool = True

    def __post_init__(self) -> None:
        if self.n <= 0:
            raise ValueError(f"Every(n) needs a positive n, got {self.n}")

    def __call__(self, step: int) -> bool:
        return step % self.n == 0 or (self.first and step == 1)


@dataclass(frozen=True)
class LogSpaced(_Combinable):
    """The steps ``round(10 ** (k / per_decade))`` for k = 0, 1, 2, ...: 1, 2, 3, 4, 5, 6, 8, 10, 13, ...

    (for 10 per decade; small steps that several k round to appear once).
    """

    per_decade: int = 10

    def __post_init__(self) -> None:
        if self.per_decade <= 0:
            raise ValueError(f"LogSpaced needs a positive per_decade, got {self.per_decade}")

    def __call__(self, step: int) -> bool:
        if step < 1:
            return False
        k = round(self.per_decade * math.log10(step))
        return any(round(10 ** (j / self.per_decade)) == step for j in (k - 1, k, k + 1) if j >= 0)


@dataclass(frozen=True)
class Steps(_Combinable):
    """An explicit set of steps."""

    steps: frozenset[int]

    def __init__(self, steps: Iterable[int]) -> None:
        object.__setattr__(self, "steps", frozenset(int(s) for s in steps))

    def __call__(self, step: int) -> bool:
        return step in self.steps


@dataclass(frozen=True)
class AnyOf(_Combinable):
    """Records a step when any of ``schedules`` does."""

    schedules: tuple[Schedule, ...]

    def __call__(self, step: int) -> bool:
        return any(s(step) for s in self.schedules)


def make_schedule(config: ProbeConfig) -> Schedule:
    """The schedule a :class:`ProbeConfig` describes."""
    if config.schedule == "log":
        log_spaced = LogSpaced(config.per_decade)
        return log_spaced | Every(config.every) if config.every > 0 else log_spaced
    return Every(config.every)
