"""Checkpoints (DESIGN §5): our own, other codebases' (the GPAS paper code's, Hugging Face LLaMA,
Mistral, Qwen2) loaded into our model, and any other causal LM loaded with transformers.

- ``files``: reading ``config.json``, weights (safetensors, sharded, ``pytorch_model.bin``) and a
  checkpoint's own tokenizer (GGUF files: :mod:`gpas_probe.hf.gguf`);
- ``layout``: the HF LLaMA key map of our weights and the ``config.json`` we write;
- ``steps``: the one rule for step checkpoints (``step_N``, ``checkpoint-N``) and run folders;
- ``native``: saving and loading ours; ``scheme`` + ``foreign``: others' into our model;
- ``loader``: :func:`load` (a declared :class:`Loaded`: model, step, path) for any backend.
"""

from typing import TYPE_CHECKING

from gpas_probe.lazy import lazy_exports

# each name imports its module on first use (gpas_probe.lazy): importing the package costs nothing
__getattr__, __dir__ = lazy_exports(__name__, {
    "gpas_probe.checkpoints.files": ("CONFIG_NAME", "own_tokenizer", "read_config", "read_weights"),
    "gpas_probe.checkpoints.foreign": ("config_from_hf", "load_foreign"),
    "gpas_probe.checkpoints.layout": ("assign_weights", "hf_config", "parameter_map"),
    "gpas_probe.config": ("BACKENDS",),
    "gpas_probe.checkpoints.loader": ("Loaded", "load", "load_checkpoint", "step_loaders"),
    "gpas_probe.checkpoints.native": ("save_checkpoint",),
    "gpas_probe.checkpoints.scheme": ("infer_scheme",),
    "gpas_probe.checkpoints.steps": ("checkpoint_step", "resolve_checkpoint", "run_of", "step_checkpoints",
                                     "step_from_name"),
})

if TYPE_CHECKING:
    from gpas_probe.checkpoints.files import CONFIG_NAME, own_tokenizer, read_config, read_weights
    from gpas_probe.checkpoints.foreign import config_from_hf, load_foreign
    from gpas_probe.checkpoints.layout import assign_weights, hf_config, parameter_map
    from gpas_probe.checkpoints.loader import Loaded, load, load_checkpoint, step_loaders
    from gpas_probe.checkpoints.native import save_checkpoint
    from gpas_probe.checkpoints.scheme import infer_scheme
    from gpas_probe.checkpoints.steps import (
        checkpoint_step,
        resolve_checkpoint,
        run_of,
        step_checkpoints,
        step_from_name,
    )
    from gpas_probe.config import BACKENDS

__all__ = ["BACKENDS", "CONFIG_NAME", "Loaded", "assign_weights", "checkpoint_step", "config_from_hf", "hf_config",
           "infer_scheme", "load", "load_checkpoint", "load_foreign", "own_tokenizer", "parameter_map", "read_config",
           "read_weights", "resolve_checkpoint", "run_of", "save_checkpoint", "step_checkpoints", "step_from_name",
           "step_loaders"]
