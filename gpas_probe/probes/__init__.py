"""Probes: per-layer statistics of activations, gradients, parameters and GPAS gates during training.

See :mod:`gpas_probe.probes.session` for how a probe is driven and :mod:`gpas_probe.probes.stats` for
the exact definitions; rows are stored by :mod:`gpas_probe.store`.
"""

from gpas_probe.probes.config import ACTIVATION_SITES, DIRECTIONS, FAMILIES, ProbeConfig
from gpas_probe.probes.schedules import AnyOf, Every, LogSpaced, Schedule, Steps, make_schedule
from gpas_probe.probes.session import Probe, attach, find_blocks
from gpas_probe.store import load_run, load_runs, read_meta

__all__ = [
    "ACTIVATION_SITES", "DIRECTIONS", "FAMILIES", "AnyOf", "Every", "LogSpaced", "Probe", "ProbeConfig",
    "Schedule", "Steps", "attach", "find_blocks", "load_run", "load_runs", "make_schedule", "read_meta",
]
