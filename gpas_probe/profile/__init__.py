"""Profiles of trained checkpoints: forward/backward statistics at every site and layer importance.

A profile evaluates a checkpoint on evaluation batches (:mod:`gpas_probe.evaldata`) and records, in
the training schema of :mod:`gpas_probe.store`, one "step" per checkpoint, whose ``step`` is the
checkpoint's training step (its ``step_N``/``checkpoint-N`` folder name when the checkpoint does not
record it; 0 when neither tells):

- every probe family of :mod:`gpas_probe.probes` pooled over all batches as one recorded step:
  ``fwd``/``bwd`` ``var``, ``rms``, ``absmax`` at every residual site, shortcut/branch ratios, per
  layer ``grad_norm`` and ``weight_norm`` (no ``update_ratio``: nothing is updated), the GPAS gates
  with ``alpha_grad``, and the model's global ``grad_norm``. Padding is excluded from every
  statistic. Gradients are those of the token-mean loss over all target tokens of all batches,
  as if the batches were one: each batch backpropagates its summed cross-entropy divided by the
  total target count (known before the first batch), so ``bwd`` statistics and gradient norms do
  not depend on how the tokens are split into batches;
- layer importance (:mod:`gpas_probe.analysis.passes`, rows of :func:`gpas_probe.analysis.to_long`): the loss
  increase when each decoder layer is deleted (``site='importance'``, ``deletion_delta`` and
  ``deletion_loss``) measured exactly (``Measurements.deletion="exact"``, the default), or its
  first-order estimate from the backward pass (``deletion_estimate``, ``"estimate"``), or both; block
  influence (``block_influence``) and the angular distances (``site='angular_n{n}'``,
  ``angular_distance`` and the per-row normalized ``angular_distance_norm``);
- the validation loss, ``layer=-1, site='model', stat='val_loss'`` (the token-mean loss over the
  batches).

Each batch is read once: one forward (and one backward for the statistics or the estimate), captured
layer by layer; every importance analysis reads that pass (exact deletion replays only the layers after
each deleted one on the captured states), so memory does not grow with the number of batches.

Checkpoints of architectures the native loader does not read (anything but our own, the GPAS code's,
LLaMA, Mistral and Qwen2) are loaded with ``transformers`` when it is installed (the ``hf`` extra;
``LoadSpec(backend="hf")`` forces it, ``"native"`` refuses it) and profiled at the sites their layers expose
(:mod:`gpas_probe.hf`): every layer's ``resid_pre``/``resid_post``, all sites for layers of a known
structure. Importance is computed from the same definitions and the same single pass (the later layers
replayed, or, for a model whose head is not a final norm and a linear map, one forward per deleted layer).

Output layout (``out`` holds one run folder per run)::

    OUT/RUN_ID/profile.json             what was profiled: per checkpoint its path, step, config.json,
                                        tokenizer, validation loss and seconds; the data and options
    OUT/RUN_ID/probes/_meta.json        store metadata (the same options, the model config, versions)
    OUT/RUN_ID/probes/part-*.parquet    the rows, one step per checkpoint

Checkpoints of one training run share a run folder, so the steps of that folder show importance over
training: a run folder (``checkpoints/step_*``) or a folder of ``step_*`` checkpoints gives all its
steps (only the latest with ``latest=True``), and step checkpoints given one by one join their run's
folder. ``RUN_ID`` is the run folder's name (a lone checkpoint's own folder name), or ``run_id=``
for everything given. A run folder is written under a temporary name and renamed into place when
complete; an existing one is replaced only with ``overwrite=True``, and only if it is a profile.

Modules: ``config`` (:class:`ProfileConfig`: evaluation batches, loading, measurements), ``targets``
(ours or a Hugging Face model behind one interface), ``measure`` (:func:`profile_model`), ``groups``
(which checkpoints share a run folder) and ``runner`` (:func:`profile_many`, :func:`profile_checkpoint`).
"""

from typing import TYPE_CHECKING

from gpas_probe.lazy import lazy_exports

# each name imports its module on first use (gpas_probe.lazy): importing the package costs nothing
__getattr__, __dir__ = lazy_exports(__name__, {
    "gpas_probe.profile.config": ("DELETION_MODES", "EvalSpec", "LoadSpec", "Measurements", "ProfileConfig"),
    "gpas_probe.profile.groups": ("PROFILE_FILE", "checkpoint_groups"),
    "gpas_probe.profile.measure": ("profile_model",),
    "gpas_probe.profile.runner": ("ProfileProgress", "profile_checkpoint", "profile_many"),
})

if TYPE_CHECKING:
    from gpas_probe.profile.config import DELETION_MODES, EvalSpec, LoadSpec, Measurements, ProfileConfig
    from gpas_probe.profile.groups import PROFILE_FILE, checkpoint_groups
    from gpas_probe.profile.measure import profile_model
    from gpas_probe.profile.runner import ProfileProgress, profile_checkpoint, profile_many

__all__ = ["DELETION_MODES", "PROFILE_FILE", "EvalSpec", "LoadSpec", "Measurements", "ProfileConfig",
           "ProfileProgress", "checkpoint_groups", "profile_checkpoint", "profile_many", "profile_model"]
