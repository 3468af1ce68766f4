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

from typing import TYPE_CHECKING

from gpas_probe.lazy import lazy_exports

# each name imports its module on first use (gpas_probe.lazy); the Trainer callback subclasses
# transformers' TrainerCallback, so `import gpas_probe.hf` works without the extra
__getattr__, __dir__ = lazy_exports(__name__, {
    "gpas_probe.hf.callback": ("GpasProbeCallback",),
    "gpas_probe.hf.importance": ("layer_importance",),
    "gpas_probe.hf.loading": ("load_hf_causal_lm", "logits", "require_transformers"),
    "gpas_probe.model.adapter": ("ATTR", "LAYOUTS", "HFLayer", "Layout", "find_decoder_layers", "instrument",
                                 "instrument_if_hf", "is_hf_model", "is_instrumented", "layout_of", "uninstrument"),
})

if TYPE_CHECKING:
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
