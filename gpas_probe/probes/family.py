"""What every statistic family is: one small class per family of statistics (DESIGN §6).

A family registers its hooks when a step is armed (:meth:`StatFamily.arm`), may do device work after
the optimizer step (:meth:`StatFamily.finish`), and turns the collected host values into rows
(:meth:`StatFamily.rows`). The families, each in its module with its definitions:
:mod:`~gpas_probe.probes.activations` (``var``, ``rms``, ``absmax`` forward and backward),
:mod:`~gpas_probe.probes.ratios` (shortcut/branch), :mod:`~gpas_probe.probes.params` (gradient and
weight norms, update ratio), :mod:`~gpas_probe.probes.gates` (GPAS gates) and
:mod:`~gpas_probe.probes.model_level` (loss, learning rate, global gradient norm, tokens).
Statistics cover the positions a token mask keeps (:meth:`Recording.keep`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from gpas_probe.probes.accumulator import Key
from gpas_probe.probes.recording import Recording

Emit = Callable[[int, str, str, str, float], None]  # (layer, site, direction, stat, value)


def div(a: float, b: float) -> float:
    """``a / b`` with IEEE semantics for ``b == 0`` (NaN for 0/0, signed infinity otherwise)."""
    if b == 0:
        return math.nan if a == 0 or math.isnan(a) else math.copysign(math.inf, a)
    return a / b


def nan_sqrt(a: float) -> float:
    """``sqrt(a)``, NaN for negative or NaN ``a``."""
    return math.sqrt(a) if a >= 0 else math.nan  # NaN stays NaN


class StatFamily:
    """Base class: a family does nothing unless it overrides these."""

    name: ClassVar[str]

    def arm(self, rec: Recording) -> None:
        pass

    def finish(self, rec: Recording, info: Mapping[str, Any]) -> None:
        pass

    def rows(self, values: Mapping[Key, float], info: Mapping[str, Any], emit: Emit) -> None:
        pass

