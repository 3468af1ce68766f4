"""Optional dependencies ("extras"): one place that names what to install for each."""

from __future__ import annotations

import importlib
from types import ModuleType

#: ``pip install`` lines of the extras, by extra name.
EXTRAS = {name: f'pip install "gpas-probe[{name}]"' for name in ("hf", "tensorboard", "wandb", "mlflow")}


def install_hint(extra: str) -> str:
    """The command that installs ``extra``, e.g. ``pip install "gpas-probe[hf]"``."""
    return EXTRAS[extra]


def require(module: str, extra: str, why: str) -> ModuleType:
    """Import ``module``, or raise an ``ImportError`` that says it is needed ``why`` and how to install it
    (e.g. ``require("transformers", "hf", "for Hugging Face models")``)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"{module} is needed {why}; install the {extra} extra: {install_hint(extra)}") from None
