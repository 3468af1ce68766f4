"""Loading Hugging Face causal LMs with ``transformers`` (the ``hf`` extra), from local files only."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from gpas_probe.extras import require

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)


def require_transformers() -> ModuleType:
    """The ``transformers`` module, or an ``ImportError`` that names the extra to install."""
    return require("transformers", "hf", "for Hugging Face models")


@contextmanager
def quiet(transformers: ModuleType) -> Iterator[None]:
    """transformers' own logging at errors only, no progress bars and no Python warnings, restored afterwards."""
    tlog = transformers.utils.logging
    verbosity, bars = tlog.get_verbosity(), tlog.is_progress_bar_enabled()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        tlog.set_verbosity(verbosity)
        if bars:
            tlog.enable_progress_bar()


def load_hf_causal_lm(ckpt: str | Path, dtype: torch.dtype | None = None,
                      device: str | torch.device | None = None, **options: Any) -> nn.Module:
    """A checkpoint folder loaded with ``AutoModelForCausalLM`` from local files only, in eval mode
    (:func:`gpas_probe.checkpoints.load_checkpoint` with ``backend="hf"`` also takes a run folder);
    ``dtype`` defaults to the stored one. Weights the model does not use, or weights it lacks, are an
    error (a model partly initialised at random would be profiled silently). ``options`` go to
    ``from_pretrained`` (e.g. ``gguf_file``, :mod:`gpas_probe.hf.gguf`)."""
    transformers = require_transformers()
    ckpt = Path(ckpt)
    major = int(transformers.__version__.split(".")[0])
    kwargs: dict[str, Any] = {"local_files_only": True, "output_loading_info": True,
                              ("dtype" if major >= 5 else "torch_dtype"): dtype if dtype is not None else "auto",
                              **options}
    try:
        with quiet(transformers):  # its load report and warnings would bury our one-line errors
            model, info = transformers.AutoModelForCausalLM.from_pretrained(str(ckpt), **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError, AttributeError) as e:
        lines = str(e).strip().splitlines()
        raise ValueError(f"{ckpt}: transformers cannot load it ({lines[0] if lines else type(e).__name__})") from None
    bad = {k: sorted(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(bad.values()):
        what = "; ".join(f"{k.replace('_', ' ')}: {v[:3]}{' ...' if len(v) > 3 else ''} ({len(v)})"
                         for k, v in bad.items() if v)
        raise ValueError(f"{ckpt}: the weights do not match {type(model).__name__} ({what})")
    if device is not None:
        model = model.to(device)
    log.info("loaded %s with transformers: %s, %s", ckpt, type(model).__name__, next(model.parameters()).dtype)
    return model.eval()


def logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The logits of a Hugging Face causal LM (no KV cache)."""
    return model(input_ids=input_ids, use_cache=False).logits
