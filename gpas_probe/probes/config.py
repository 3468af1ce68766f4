"""What a probe records and when: :class:`ProbeConfig`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from gpas_probe.config import from_fields

#: Statistic families, in the order their rows are written.
FAMILIES = ("activations", "outliers", "ratios", "params", "gpas", "model")
#: Residual-stream sites recorded by the ``activations`` family (DESIGN §6).
ACTIVATION_SITES = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")
DIRECTIONS = ("fwd", "bwd")
SCHEDULES = ("every", "log")


def _check_subset(name: str, values: tuple[str, ...], allowed: tuple[str, ...]) -> None:
    bad = [v for v in values if v not in allowed]
    if bad:
        raise ValueError(f"unknown {name} {bad}; choose from {', '.join(allowed)}")


@dataclass
class ProbeConfig:
    """Which statistics to record, on which steps, and how often to write them.

    ``schedule="every"`` records step 1 and every ``every``-th step; ``"log"`` records log-spaced
    steps (``per_decade`` per decade: 1, 2, 3, 4, 5, 6, 8, 10, 13, ...) and also every ``every``-th
    step when ``every > 0``. ``stats`` picks statistic families, ``sites`` the residual sites and
    ``directions`` fwd (activations) and/or bwd (their gradients) of the ``activations`` family.
    Position 0 of each sequence is included unless ``skip_first_position`` (its residual stream is
    often an outlier, the attention sink). A kept token whose RMS over the hidden dimension exceeds
    ``outlier_factor`` times the median token's is an *outlier token* (a sink, a massive activation):
    the ``outliers`` family records them and the statistics without them (``var_robust`` ...), and the
    shortcut/branch ratio has a ``_robust`` twin. ``intervals`` adds 95% confidence bounds (``_lo``,
    ``_hi``) from per-sequence sums to the statistics a diagnosis reads (profiles turn it on).
    Rows reach disk every ``flush_rows`` rows, ``flush_steps`` recorded steps or ``flush_seconds`` seconds,
    whichever comes first (and at every checkpoint), so a live run can be read.
    """

    every: int = 100
    schedule: str = "every"
    per_decade: int = 10
    stats: tuple[str, ...] = FAMILIES
    sites: tuple[str, ...] = ACTIVATION_SITES
    directions: tuple[str, ...] = DIRECTIONS
    skip_first_position: bool = False
    outlier_factor: float = 10.0
    intervals: bool = False
    flush_rows: int = 100_000
    flush_steps: int = 50
    flush_seconds: float = 30.0

    def __post_init__(self) -> None:
        self.stats, self.sites, self.directions = tuple(self.stats), tuple(self.sites), tuple(self.directions)
        _check_subset("statistic families", self.stats, FAMILIES)
        _check_subset("sites", self.sites, ACTIVATION_SITES)
        _check_subset("directions", self.directions, DIRECTIONS)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown probe schedule {self.schedule!r}; choose from {', '.join(SCHEDULES)}")
        if self.every < 0 or (self.schedule == "every" and self.every == 0):
            raise ValueError(f"probe every must be positive, got {self.every}")
        if not self.outlier_factor > 1:
            raise ValueError(f"outlier_factor must be above 1, got {self.outlier_factor}")
        if self.per_decade <= 0:
            raise ValueError(f"per_decade must be positive, got {self.per_decade}")
        if self.flush_rows <= 0 or self.flush_steps <= 0 or self.flush_seconds <= 0:
            raise ValueError(f"flush_rows, flush_steps and flush_seconds must be positive, got {self.flush_rows}, "
                             f"{self.flush_steps}, {self.flush_seconds}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProbeConfig:
        return from_fields(cls, d)
