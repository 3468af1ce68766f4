"""Probes: per-layer statistics of activations, gradients, parameters and GPAS gates during training.

``session`` (:class:`Probe`, :func:`attach`: how a probe is driven), ``driver`` (who drives it),
``schedules`` (when to record), ``config``, ``recording`` + ``tokens`` + ``accumulator`` (one armed
step's hooks, the per-token rows its hooks reduce tensors to, and device sums), and one module per
statistic family with its exact definitions: ``activations``, ``outliers``, ``ratios``, ``params``,
``gates``, ``model_level`` (base class in ``family``). Rows go to :mod:`gpas_probe.store`.
"""

from typing import TYPE_CHECKING

from gpas_probe.lazy import lazy_exports

# each name imports its module on first use (gpas_probe.lazy): importing the package costs nothing
__getattr__, __dir__ = lazy_exports(__name__, {
    "gpas_probe.probes.config": ("ACTIVATION_SITES", "DIRECTIONS", "FAMILIES", "ProbeConfig"),
    "gpas_probe.probes.driver": ("Driver",),
    "gpas_probe.probes.schedules": ("AnyOf", "Every", "LogSpaced", "Schedule", "Steps", "make_schedule"),
    "gpas_probe.probes.session": ("Probe", "attach", "find_blocks"),
    "gpas_probe.store": ("load_run", "load_runs", "read_meta"),
})

if TYPE_CHECKING:
    from gpas_probe.probes.config import ACTIVATION_SITES, DIRECTIONS, FAMILIES, ProbeConfig
    from gpas_probe.probes.driver import Driver
    from gpas_probe.probes.schedules import AnyOf, Every, LogSpaced, Schedule, Steps, make_schedule
    from gpas_probe.probes.session import Probe, attach, find_blocks
    from gpas_probe.store import load_run, load_runs, read_meta

__all__ = ["ACTIVATION_SITES", "DIRECTIONS", "FAMILIES", "AnyOf", "Driver", "Every", "LogSpaced", "Probe",
           "ProbeConfig", "Schedule", "Steps", "attach", "find_blocks", "load_run", "load_runs", "make_schedule",
           "read_meta"]
