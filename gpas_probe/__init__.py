"""gpas-probe: are my deep layers doing anything? Train, probe and profile LLaMA-style models under
every normalization scheme of the GPAS paper, with and without Gradient-Preserving Activation Scaling."""

__version__ = "0.1.0"

from gpas_probe.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from gpas_probe.config import ModelConfig, NormScheme, TrainConfig  # noqa: E402
from gpas_probe.gpas import GPAS  # noqa: E402
from gpas_probe.model import build_model  # noqa: E402
from gpas_probe.probes import Probe, ProbeConfig, attach  # noqa: E402
from gpas_probe.store import load_run, load_runs  # noqa: E402
from gpas_probe.train import train  # noqa: E402

__all__ = ["GPAS", "ModelConfig", "NormScheme", "Probe", "ProbeConfig", "TrainConfig", "__version__", "attach",
           "build_model", "load_checkpoint", "load_run", "load_runs", "save_checkpoint", "train"]
