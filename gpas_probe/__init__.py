"""gpas-probe: are my deep layers doing anything? Train, probe and profile LLaMA-style models under
every normalization scheme of the GPAS paper, with and without Gradient-Preserving Activation Scaling.

The map of the package is in the README ("Package map")."""

from gpas_probe._version import __version__
from gpas_probe.checkpoints import load_checkpoint, save_checkpoint
from gpas_probe.config import ModelConfig, NormScheme, TrainConfig
from gpas_probe.gpas import GPAS
from gpas_probe.model import build_model
from gpas_probe.probes import Probe, ProbeConfig, attach
from gpas_probe.store import load_run, load_runs
from gpas_probe.training import train

__all__ = ["GPAS", "ModelConfig", "NormScheme", "Probe", "ProbeConfig", "TrainConfig", "__version__", "attach",
           "build_model", "load_checkpoint", "load_run", "load_runs", "save_checkpoint", "train"]
