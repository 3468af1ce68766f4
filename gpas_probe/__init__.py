"""gpas-probe: are my deep layers doing anything? Train, probe and profile LLaMA-style models under
every normalization scheme of the GPAS paper, with and without Gradient-Preserving Activation Scaling.

The names below import their module on first use (:mod:`gpas_probe.lazy`), so ``import gpas_probe``
does not import torch. The map of the package is in docs/package-map.md."""

from typing import TYPE_CHECKING

from gpas_probe._version import __version__
from gpas_probe.lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "gpas_probe.checkpoints": ("load_checkpoint", "save_checkpoint"),
    "gpas_probe.config": ("ModelConfig", "NormScheme", "TrainConfig"),
    "gpas_probe.gpas": ("GPAS",),
    "gpas_probe.model": ("build_model",),
    "gpas_probe.probes": ("Probe", "ProbeConfig", "attach"),
    "gpas_probe.store": ("load_run", "load_runs"),
    "gpas_probe.training": ("train",),
})

if TYPE_CHECKING:
    from gpas_probe.checkpoints import load_checkpoint, save_checkpoint
    from gpas_probe.config import ModelConfig, NormScheme, TrainConfig
    from gpas_probe.gpas import GPAS
    from gpas_probe.model import build_model
    from gpas_probe.probes import Probe, ProbeConfig, attach
    from gpas_probe.store import load_run, load_runs
    from gpas_probe.training import train

__all__ = ["GPAS", "ModelConfig", "NormScheme", "Probe", "ProbeConfig", "TrainConfig", "__version__", "attach",
           "build_model", "load_checkpoint", "load_run", "load_runs", "save_checkpoint", "train"]
