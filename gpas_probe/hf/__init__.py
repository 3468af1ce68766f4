"""Hugging Face causal LMs (the ``hf`` extra: ``pip install "gpas-probe[hf]"``).

- :func:`instrument` (from :mod:`gpas_probe.model.adapter`, which needs no transformers) gives any HF
  causal LM the probed layers the probes record, without changing it (outputs, parameters,
  ``state_dict`` keys);
- ``loading``: :func:`load_hf_causal_lm`, ``AutoModelForCausalLM`` from local files;
- ``importance``: :func:`layer_importance` of an HF model, by the definitions of our own;
- ``callback``: ``GpasProbeCallback`` for the ``Trainer`` (``from gpas_probe.hf.callback import
  GpasProbeCallback``, or ``gpas_probe.hf.GpasProbeCallback``, which imports that module on first use:
  it needs transformers to import).

Importing this package does not need transformers; the functions that do raise an ``ImportError``
naming the extra.
"""

from gpas_probe.hf.importance import layer_importance
from gpas_probe.hf.loading import load_hf_causal_lm, logits, require_transformers
from gpas_probe.model.adapter import (
    ATTR,
    LAYOUTS,
    HFLayer,
    Layout,
    find_decoder_layers,
    instrument,
    instrument_if_hf,
    is_hf_model,
    is_instrumented,
    layout_of,
    uninstrument,
)

__all__ = ["ATTR", "LAYOUTS", "HFLayer", "Layout", "find_decoder_layers", "instrument", "instrument_if_hf",
           "is_hf_model", "is_instrumented", "layer_importance", "layout_of", "load_hf_causal_lm", "logits",
           "require_transformers", "uninstrument"]


def __getattr__(name: str) -> object:
    # the Trainer callback subclasses transformers' TrainerCallback, so its module needs transformers:
    # it is imported on first use, and `import gpas_probe.hf` works without the extra
    if name == "GpasProbeCallback":
        from gpas_probe.hf.callback import GpasProbeCallback

        return GpasProbeCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
