"""Hugging Face causal LMs: probes, profiles and a ``Trainer`` callback (the ``hf`` extra).

Needs ``transformers`` (``pip install "gpas-probe[hf]"``; the ``Trainer`` also needs ``accelerate``).
Importing this module does not need it; the functions that do raise an ``ImportError`` naming the extra.

**Instrumenting.** :func:`instrument` gives a model the :class:`~gpas_probe.model.block.ProbedLayer`
objects the probes record, one :class:`HFLayer` per decoder layer, without changing the model:

- the decoder layer list is found by a table of known paths (``model.layers`` for LLaMA, Mistral,
  Qwen, Gemma..., ``transformer.h`` for GPT-2, ``gpt_neox.layers``, ``model.decoder.layers``...),
  else it is the shallowest, then longest, ``nn.ModuleList`` of modules of one class;
- every layer keeps its place and its class; persistent forward (pre-)hooks on the layer and on a
  few of its children pass the tensors the layer already computes through the hook points of its
  ``HFLayer`` (identities that return the very tensor they get, so outputs are bit-identical and
  gradients at a site are those of the tensor the model uses);
- the ``HFLayer`` objects sit in one ``nn.ModuleList`` registered as ``model.gpas_probe_layers``:
  they hold only parameter-free hook points and reach their decoder layer through a plain
  (unregistered) attribute, so ``state_dict()`` keys, ``save_pretrained`` files and
  ``model.parameters()`` are unchanged, while :func:`gpas_probe.probes.find_blocks` finds them in
  ``model.modules()``. ``HFLayer.parameters()`` yields its decoder layer's parameters (the
  per-layer gradient and weight norms).

Sites recorded (``HFLayer.sites``):

- every layer: ``resid_pre`` (the layer's input hidden states, its first positional argument or
  ``hidden_states=``) and ``resid_post`` (its output hidden states: the output, or its first element);
- layers of a known structure (:data:`LAYOUTS`, by class: LLaMA-like pre-norm layers, Gemma-2/3
  sandwich layers, OLMo-2 branch-norm layers, Phi-3, GPT-2) also ``attn_out`` and ``mlp_out`` (each
  sub-layer's branch as it enters the residual add), ``resid_mid`` (the residual stream between the
  two sub-layers) and the shortcuts ``attn_shortcut = resid_pre``, ``mlp_shortcut = resid_mid``, so
  every statistic of the native model is recorded, shortcut/branch ratios included;
- other layers: ``attn_out`` and ``mlp_out`` are the (first) outputs of a child named like an
  attention (``self_attn``, ``attn``, ``attention``, ``self_attention``) or an MLP (``mlp``,
  ``feed_forward``, ``ffn``, ``block_sparse_moe``) when there is one, which may differ from the
  branch as added (a residual multiplier, a norm or dropout after it); ``resid_mid`` and the
  shortcuts are absent, so no rows are written for them (nor ratios).

Sub-layer sites are read only while their decoder layer's own forward runs, and nothing is read
while a backward pass runs: the recomputation of a gradient-checkpointed layer is not recorded
twice, whether the checkpoint wraps the layer's forward (transformers 5) or its call. With reentrant
checkpointing (``use_reentrant=True``; transformers' default is non-reentrant) the first forward of a
checkpointed layer runs without gradients, so only ``resid_pre``/``resid_post`` are recorded.

**Profiles.** :func:`load_hf_causal_lm` loads a checkpoint with ``AutoModelForCausalLM`` (local
files only); :func:`layer_importance` computes deletion importance, angular distances and block
influence of an instrumented model from the same definitions as
:mod:`gpas_probe.analysis.importance` (``h_l`` is the residual stream entering layer ``l``, ``h_L``
the last layer's output before the final norm); deleting a layer replaces its output by its input,
one forward pass per layer and batch (no prefix reuse).

**Training.** ``GpasProbeCallback`` (a ``transformers.TrainerCallback``) records a ``Trainer`` run
in the probe schema; see its docstring.
"""

from __future__ import annotations

import importlib
import logging
import math
import sys
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from gpas_probe.model.block import SITES, ProbedLayer

log = logging.getLogger(__name__)

INSTALL_HINT = 'pip install "gpas-probe[hf]"'
#: The attribute of an instrumented model that holds its HFLayer objects.
ATTR = "gpas_probe_layers"
#: Where causal LMs keep their decoder layers, tried in order before the generic search.
LAYER_PATHS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers", "transformer.layers",
               "transformer.blocks", "model.language_model.layers", "language_model.model.layers", "layers", "h",
               "decoder.layers", "blocks")
ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
MLP_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe")


def require_transformers() -> ModuleType:
    """The ``transformers`` module, or an ``ImportError`` that names the extra to install."""
    try:
        return importlib.import_module("transformers")
    except ImportError:
        raise ImportError(f"Hugging Face models need the hf extra (transformers): {INSTALL_HINT}") from None


# ------------------------------------------------------------------------------------------ layouts


@dataclass(frozen=True)
class Layout:
    """Where a decoder layer's sub-layer branches and middle residual stream can be read.

    ``attn_branch``/``mlp_branch``: the child whose (first) output is the branch as it enters the
    residual add; ``mid``: the child whose first input is the residual stream between the two
    sub-layers; ``absent``: children whose presence means another wiring (then no layout applies)."""

    name: str
    attn_branch: str
    mlp_branch: str
    mid: str
    absent: tuple[str, ...] = ()


PRE = Layout("pre", "self_attn", "mlp", "post_attention_layernorm")
#: Gemma-2/3: a norm on each branch output, another before the MLP.
SANDWICH = Layout("sandwich", "post_attention_layernorm", "post_feedforward_layernorm", "pre_feedforward_layernorm")
#: OLMo-2/3: no input norms, a norm on each branch output.
BRANCH_NORM = Layout("branch-norm", "post_attention_layernorm", "post_feedforward_layernorm", "mlp")
PHI3 = Layout("pre", "resid_attn_dropout", "resid_mlp_dropout", "post_attention_layernorm")
GPT2 = Layout("pre", "attn", "mlp", "ln_2", absent=("crossattention",))

#: Decoder layer classes (by name) whose forward is known: every one is checked by the tests to
#: satisfy ``resid_mid = resid_pre + attn_out`` and ``resid_post = resid_mid + mlp_out``.
LAYOUTS: dict[str, Layout] = {
    **dict.fromkeys(("LlamaDecoderLayer", "MistralDecoderLayer", "MixtralDecoderLayer", "Qwen2DecoderLayer",
                     "Qwen2MoeDecoderLayer", "Qwen3DecoderLayer", "Qwen3MoeDecoderLayer", "GemmaDecoderLayer",
                     "OlmoDecoderLayer", "SmolLM3DecoderLayer", "Starcoder2DecoderLayer"), PRE),
    **dict.fromkeys(("Gemma2DecoderLayer", "Gemma3DecoderLayer"), SANDWICH),
    **dict.fromkeys(("Olmo2DecoderLayer", "Olmo3DecoderLayer"), BRANCH_NORM),
    "Phi3DecoderLayer": PHI3,
    "GPT2Block": GPT2,
}


def layout_of(layer: nn.Module) -> Layout | None:
    """The known :class:`Layout` of a decoder layer, or None."""
    layout = LAYOUTS.get(type(layer).__name__)
    if layout is None:
        return None
    children = dict(layer.named_children())
    if any(n not in children for n in (layout.attn_branch, layout.mlp_branch, layout.mid)):
        return None
    if any(n in children for n in layout.absent):
        return None
    return layout


# ------------------------------------------------------------------------------------------ tensors


def _first_tensor(value: Any) -> torch.Tensor | None:
    """A (batch, seq, hidden) tensor: the value itself or the first element of a tuple/list output."""
    if isinstance(value, (tuple, list)) and value:
        value = value[0]
    return value if isinstance(value, torch.Tensor) and value.dim() == 3 else None


def _hidden_in(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    """A layer's input hidden states: its first positional argument or ``hidden_states=``."""
    value = args[0] if args else kwargs.get("hidden_states")
    return value if isinstance(value, torch.Tensor) and value.dim() == 3 else None


def _with_first(output: Any, x: torch.Tensor) -> Any:
    """``output`` with its hidden states (itself, or its first element) replaced by ``x``."""
    if isinstance(output, tuple):
        return (x, *output[1:])
    if isinstance(output, list):
        return [x, *output[1:]]
    return x


# ---------------------------------------------------------------------------------------- HFLayer

def _in_backward() -> bool:
    """Whether the autograd engine is running a backward pass (a checkpoint's recomputation)."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called")


class HFLayer(ProbedLayer):
    """The probed view of one decoder layer of another library's model (module doc).

    ``target`` is the decoder layer (not a registered child: it adds nothing to the state dict);
    ``layout`` its :class:`Layout` or None; ``sites`` the hook points that fire."""

    def __init__(self, target: nn.Module, layer: int, layout: Layout | None = None) -> None:
        super().__init__(layer)
        self.__dict__["target"] = target  # plain attribute: not a submodule
        self.layout = layout
        self._hooks: list[tuple[nn.Module, int]] = []  # (module, hook id): removable after a deepcopy too
        self._active = False  # inside the target's forward
        self.sites = self._install()

    # -- hooks ---------------------------------------------------------------------------------
    def _add(self, handle: Any, module: nn.Module) -> None:
        self._hooks.append((module, handle.id))

    def _child(self, names: Iterable[str]) -> nn.Module | None:
        children = dict(self.target.named_children())
        return next((children[n] for n in names if n in children), None)

    def _install(self) -> tuple[str, ...]:
        t = self.target
        self._add(t.register_forward_pre_hook(self._enter, with_kwargs=True), t)
        self._add(t.register_forward_hook(self._exit, always_call=True), t)
        sites = {"resid_pre", "resid_post"}
        if self.layout is not None:
            lay = self.layout
            attn, mlp, mid = (getattr(t, n) for n in (lay.attn_branch, lay.mlp_branch, lay.mid))
            self._add(attn.register_forward_hook(self._attn_out), attn)
            self._add(mlp.register_forward_hook(self._mlp_out), mlp)
            self._add(mid.register_forward_pre_hook(self._mid, with_kwargs=True), mid)
            sites = set(SITES)
        else:
            if (attn := self._child(ATTN_NAMES)) is not None:
                self._add(attn.register_forward_hook(self._attn_out), attn)
                sites.add("attn_out")
            if (mlp := self._child(MLP_NAMES)) is not None:
                self._add(mlp.register_forward_hook(self._mlp_out), mlp)
                sites.add("mlp_out")
        return tuple(s for s in SITES if s in sites)

    def remove_hooks(self) -> None:
        """Take this layer's hooks off the model (idempotent)."""
        for module, hook_id in self._hooks:
            for name in _HOOK_DICTS:
                getattr(module, name, {}).pop(hook_id, None)
        self._hooks.clear()

    def _enter(self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._active = not _in_backward()  # a checkpointed call's recomputation was recorded in the forward
        x = _hidden_in(args, kwargs) if self._active else None
        if x is not None:
            self.hook_resid_pre(x)
            if self.layout is not None:
                self.hook_attn_shortcut(x)

    def _exit(self, _module: nn.Module, _args: Any, output: Any) -> None:
        if not self._active:
            return
        self._active = False
        y = _first_tensor(output)
        if y is not None:
            self.hook_resid_post(y)

    def _attn_out(self, _module: nn.Module, _args: Any, output: Any) -> None:
        if self._active and (y := _first_tensor(output)) is not None:
            self.hook_attn_out(y)

    def _mlp_out(self, _module: nn.Module, _args: Any, output: Any) -> None:
        if self._active and (y := _first_tensor(output)) is not None:
            self.hook_mlp_out(y)

    def _mid(self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._active and (x := _hidden_in(args, kwargs)) is not None:
            self.hook_resid_mid(x)
            self.hook_mlp_shortcut(x)

    # -- the decoder layer's parameters ----------------------------------------------------------
    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:  # type: ignore[override]
        return self.target.parameters(recurse)

    def named_parameters(self, prefix: str = "", recurse: bool = True,  # type: ignore[override]
                         remove_duplicate: bool = True) -> Iterator[tuple[str, nn.Parameter]]:
        return self.target.named_parameters(prefix, recurse, remove_duplicate)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, target={type(self.target).__name__}, layout={getattr(self.layout, 'name', None)}"


# ------------------------------------------------------------------------------------ instrument


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP/FSDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    for _ in range(8):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            break
        model = inner
    return model


def _get_path(model: nn.Module, path: str) -> nn.Module | None:
    m: Any = model
    for part in path.split("."):
        m = m._modules.get(part) if isinstance(m, nn.Module) else None
        if m is None:
            return None
    return m


def _uniform(modules: nn.ModuleList) -> bool:
    return len(modules) > 0 and len({type(m) for m in modules}) == 1


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(path, layers)``: a known path (:data:`LAYER_PATHS`) holding a ``ModuleList`` of one class,
    else the shallowest, then longest, such list in the model."""
    for path in LAYER_PATHS:
        found = _get_path(model, path)
        if isinstance(found, nn.ModuleList) and _uniform(found):
            return path, found
    candidates = [(name.count("."), -len(m), i, name, m) for i, (name, m) in enumerate(model.named_modules())
                  if isinstance(m, nn.ModuleList) and _uniform(m)]
    if not candidates:
        raise ValueError(f"{type(model).__name__}: no decoder layer list found (looked for {', '.join(LAYER_PATHS)} "
                         f"and any ModuleList of one layer class)")
    *_, name, layers = min(candidates, key=lambda c: c[:3])
    return name, layers


def is_instrumented(model: nn.Module) -> bool:
    """Whether :func:`instrument` has been applied to ``model`` (and not undone)."""
    return isinstance(_unwrap(model)._modules.get(ATTR), nn.ModuleList)


def instrument(model: nn.Module, layout: Layout | None = None) -> list[ProbedLayer]:
    """Give ``model`` probed layers (module doc) and return them, by depth. Idempotent: a model that
    has probed layers already (instrumented, or a gpas_probe model) gets nothing new. ``layout``
    overrides the structure looked up by layer class (for a model of your own).
    Outputs, parameters and ``state_dict`` keys stay as they are; :func:`uninstrument` undoes it."""
    existing = sorted((m for m in model.modules() if isinstance(m, ProbedLayer)), key=lambda b: b.layer)
    if existing:
        return existing
    require_transformers()
    base = _unwrap(model)
    path, layers = find_decoder_layers(base)
    wrapped = nn.ModuleList(HFLayer(layer, i, layout or layout_of(layer)) for i, layer in enumerate(layers))
    base.add_module(ATTR, wrapped)
    sites = wrapped[0].sites
    log.info("instrumented %s: %d decoder layers of %s at %s (layout %s; sites %s)", type(base).__name__,
             len(layers), type(layers[0]).__name__, path, getattr(wrapped[0].layout, "name", "unknown"),
             ", ".join(sites))
    return list(wrapped)


def uninstrument(model: nn.Module) -> None:
    """Undo :func:`instrument`: remove its hooks and its ``gpas_probe_layers`` (no-op if not instrumented)."""
    base = _unwrap(model)
    layers = base._modules.get(ATTR)
    if not isinstance(layers, nn.ModuleList):
        return
    for hfl in layers:
        if isinstance(hfl, HFLayer):
            hfl.remove_hooks()
    del base._modules[ATTR]


def is_hf_model(model: nn.Module) -> bool:
    """Whether ``model`` (or the model inside its wrappers) is a ``transformers`` ``PreTrainedModel``;
    never imports transformers (a model of its classes cannot exist before it is imported)."""
    transformers = sys.modules.get("transformers")
    cls = getattr(transformers, "PreTrainedModel", None) if transformers is not None else None
    return cls is not None and isinstance(_unwrap(model), cls)


def instrument_if_hf(model: nn.Module) -> bool:
    """Instrument a Hugging Face model that has no probed layers; True when it was instrumented now.
    Other models are left alone (and transformers is not imported)."""
    if not is_hf_model(model) or any(isinstance(m, ProbedLayer) for m in model.modules()):
        return False
    instrument(model)
    return True


# ----------------------------------------------------------------------------------------- loading


@contextmanager
def _quiet(transformers: ModuleType) -> Iterator[None]:
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


def load_hf_causal_lm(path: str | Path, dtype: torch.dtype | None = None,
                      device: str | torch.device | None = None) -> nn.Module:
    """A checkpoint folder (or a run folder's latest) loaded with ``AutoModelForCausalLM`` from local
    files only, in eval mode; ``dtype`` defaults to the stored one. Weights the model does not use, or
    weights it lacks, are an error (a model partly initialised at random would be profiled silently)."""
    from gpas_probe.checkpoint import resolve_checkpoint

    transformers = require_transformers()
    ckpt = resolve_checkpoint(path)
    major = int(transformers.__version__.split(".")[0])
    kwargs: dict[str, Any] = {"local_files_only": True, "output_loading_info": True,
                              ("dtype" if major >= 5 else "torch_dtype"): dtype if dtype is not None else "auto"}
    try:
        with _quiet(transformers):  # its load report and warnings would bury our one-line errors
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


# -------------------------------------------------------------------------------------- importance


def logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The logits of an HF causal LM (no KV cache)."""
    return model(input_ids=input_ids, use_cache=False).logits


def _loss_sum(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> float:
    keep = labels != -100
    out = logits(model, input_ids)
    return float(F.cross_entropy(out[keep].float(), labels[keep], reduction="sum")) if keep.any() else 0.0


class _Capture:
    """The residual stream entering every layer and leaving the last, from one forward pass."""

    def __init__(self, layers: list[HFLayer]) -> None:
        self.pre: dict[int, torch.Tensor] = {}
        self.post: dict[int, torch.Tensor] = {}
        self.handles = []
        for hfl in layers:
            self.handles.append(hfl.hook_resid_pre.register_forward_hook(
                lambda _m, _a, out, i=hfl.layer: self.pre.__setitem__(i, out)))
            self.handles.append(hfl.hook_resid_post.register_forward_hook(
                lambda _m, _a, out, i=hfl.layer: self.post.__setitem__(i, out)))

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _skip_hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
    """A forward hook that deletes a layer: its output becomes its input."""
    x = _hidden_in(args, kwargs)
    if x is None:
        raise ValueError("cannot delete a layer whose input hidden states are not its first argument")
    return _with_first(output, x)


def _update(model: nn.Module, layers: list[HFLayer], batch: tuple[torch.Tensor, ...], sums: Any,
            device: torch.device) -> None:
    from gpas_probe.analysis.importance import _last_index, _unpack

    input_ids, labels, mask = _unpack(batch, device)
    rows, last = _last_index(mask)
    L = len(layers)
    cap = _Capture(layers)
    try:
        s = _loss_sum(model, input_ids, labels)
    finally:
        cap.close()
    if len(cap.pre) != L or len(cap.post) != L:
        raise ValueError(f"{type(model).__name__}: a forward pass ran {len(cap.pre)} of its {L} decoder layers")
    sums.base_loss += s
    sums.tokens += int((labels != -100).sum())
    sums.mask_tokens += int(mask.sum())
    for layer, hfl in enumerate(layers):
        x, out = cap.pre[layer], cap.post[layer]
        sums.cos_sum[layer] += float(F.cosine_similarity(x[mask].double(), out[mask].double(), dim=-1).sum())
        handle = hfl.target.register_forward_hook(_skip_hook, with_kwargs=True)
        try:
            sums.deleted_loss[layer] += _loss_sum(model, input_ids, labels)
        finally:
            handle.remove()
    if len(rows):
        states = [cap.pre[i][rows, last].double() for i in range(L)] + [cap.post[L - 1][rows, last].double()]
        u = F.normalize(torch.stack(states, dim=1), dim=-1)  # (B', L+1, hidden)
        gram = (u @ u.transpose(1, 2)).clamp(-1.0, 1.0)
        sums.angle_sum += (torch.arccos(gram) / math.pi).sum(0).cpu()
        sums.sequences += len(rows)


def layer_importance(model: nn.Module, batches: Iterable[tuple[torch.Tensor, ...]],
                     normalize_rows: bool = False) -> dict[str, pd.DataFrame]:
    """Deletion importance, angular distances and block influence of an HF causal LM (instrumented
    here if it is not yet), as :func:`gpas_probe.analysis.importance.layer_importance` returns them
    for our model: keys ``deletion``, ``angular``, ``block_influence``. Batches are
    ``(input_ids, labels[, mask])`` with labels already shifted, -100 where there is no target."""
    from gpas_probe.analysis.importance import _accumulate, _frames

    layers = [b for b in instrument(model) if isinstance(b, HFLayer)]
    if not layers:
        raise ValueError(f"{type(model).__name__} is not a Hugging Face model; use "
                         f"gpas_probe.analysis.importance.layer_importance")
    sums = _accumulate(model, batches, len(layers), lambda b, s, d: _update(model, layers, b, s, d),
                       deletion=True, angular=True, influence=True)
    return _frames(sums, normalize_rows)


# ---------------------------------------------------------------------------------------- Trainer


_TRAINER_FIELDS = ("output_dir", "learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps",
                   "max_steps", "num_train_epochs", "max_grad_norm", "weight_decay", "lr_scheduler_type",
                   "warmup_steps", "seed")


def _make_callback_class(transformers: ModuleType) -> type:
    from gpas_probe.probes import Probe, ProbeConfig
    from gpas_probe.probes.schedules import Every, Schedule

    class GpasProbeCallback(transformers.TrainerCallback):
        """Records a ``transformers.Trainer`` run with the probes, into ``out/probes/`` in the schema
        of ``gpas-probe train`` (``gpas-probe plot``/``info``/``diagnose`` read it).

        ``every`` sets the schedule (step 1 and every ``every``-th optimizer step) unless ``config``
        (a :class:`~gpas_probe.probes.ProbeConfig`) or ``schedule`` is given. The model is
        instrumented (:func:`instrument`) when training begins if it is a Hugging Face model. Each
        recorded step writes the probe statistics and, at ``layer=-1``: ``loss`` (the training loss
        of the step, over its gradient-accumulation micro-batches, as the model returned it),
        ``lr`` (the one the optimizer step used), ``grad_norm`` (of all gradients, before clipping),
        ``tokens`` (``state.num_input_tokens_seen`` when the Trainer counts them) and ``val_loss``
        when an evaluation ran right after the step. Padding (``attention_mask == 0``) is excluded
        from the activation statistics. In a distributed run only the first process records (its
        own share of the batch).
        """

        def __init__(self, out: str | Path, every: int = 100, config: ProbeConfig | None = None, *,
                     schedule: Schedule | None = None, run_id: str | None = None) -> None:
            if schedule is None and config is None:
                schedule = Every(every)
            self.out, self.config, self.schedule, self.run_id = Path(out), config, schedule, run_id
            self.probe: Probe | None = None
            self._handles: list[Any] = []
            self._losses: list[torch.Tensor] = []
            self._summed = False  # micro-batch losses are partial sums (num_items_in_batch given)
            self._lr: float | None = None
            self._pending: dict[str, Any] | None = None

        # -- capture of the loss and the padding mask ---------------------------------------------
        def _before(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if self.probe is not None and module.training and torch.is_grad_enabled():
                mask = kwargs.get("attention_mask")
                ok = isinstance(mask, torch.Tensor) and mask.dim() == 2
                self.probe.set_exclude_mask(mask == 0 if ok else None)

        def _after(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            if not (module.training and torch.is_grad_enabled()):
                return
            loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
            if isinstance(loss, torch.Tensor):
                self._losses.append(loss.detach().float().reshape(()))
                self._summed = kwargs.get("num_items_in_batch") is not None

        def _step_loss(self) -> torch.Tensor | None:
            if not self._losses:
                return None
            total = torch.stack(self._losses).sum()
            return total if self._summed else total / len(self._losses)

        # -- events ------------------------------------------------------------------------------
        def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                           **kwargs: Any) -> None:
            if not state.is_world_process_zero or self.probe is not None:
                return
            if model is None:
                raise ValueError("GpasProbeCallback needs the Trainer's model")
            instrument_if_hf(model)
            meta = {"trainer_args": {k: getattr(args, k, None) for k in _TRAINER_FIELDS}}
            self.probe = Probe(model, self.out, config=self.config, schedule=self.schedule, run_id=self.run_id,
                               meta=meta)
            self._handles = [model.register_forward_pre_hook(self._before, with_kwargs=True),
                             model.register_forward_hook(self._after, with_kwargs=True)]

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.probe is None:
                return
            self._finish_pending()
            self._losses.clear()
            self.probe.begin_step(state.global_step + 1)

        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, optimizer: Any = None,
                                  **kwargs: Any) -> None:
            if optimizer is not None:
                self._lr = float(optimizer.param_groups[0]["lr"])

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.probe is None:
                return
            tokens = getattr(state, "num_input_tokens_seen", None) or None
            self._pending = {"step": state.global_step, "loss": self._step_loss(), "lr": self._lr,
                             "grad_norm": None, "tokens": tokens, "val_loss": None}

        def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, Any] | None = None,
                        **kwargs: Any) -> None:
            if self._pending is not None and self._pending["step"] == state.global_step and metrics:
                if (v := metrics.get("eval_loss")) is not None:
                    self._pending["val_loss"] = float(v)

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.close()

        def _finish_pending(self) -> None:
            if self._pending is not None and self.probe is not None:
                info, self._pending = self._pending, None
                self.probe.end_step(SimpleNamespace(**info))

        def close(self) -> None:
            """Finish the last step, remove every hook and write what was recorded (idempotent)."""
            try:
                self._finish_pending()
            finally:
                for h in self._handles:
                    h.remove()
                self._handles.clear()
                if self.probe is not None:
                    self.probe.close()
                    self.probe = None

    return GpasProbeCallback


_CALLBACK: type | None = None


def __getattr__(name: str) -> Any:
    """``GpasProbeCallback`` is built on first use, so that importing this module needs no transformers."""
    global _CALLBACK
    if name == "GpasProbeCallback":
        if _CALLBACK is None:
            _CALLBACK = _make_callback_class(require_transformers())
        return _CALLBACK
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ATTR", "LAYOUTS", "HFLayer", "Layout", "find_decoder_layers", "instrument",
           "instrument_if_hf", "is_hf_model", "is_instrumented", "layer_importance", "layout_of",
           "load_hf_causal_lm", "require_transformers", "uninstrument"]
