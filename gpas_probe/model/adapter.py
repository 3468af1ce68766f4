"""Probing other people's models (Hugging Face causal LMs) without changing them: :func:`instrument`
gives a model the :class:`~gpas_probe.model.hooks.ProbedLayer` objects the probes record, one
:class:`HFLayer` per decoder layer. (It needs no transformers itself, so the probes use it whether or not
the ``hf`` extra is installed; :mod:`gpas_probe.hf` re-exports it.)

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
  ``model.parameters()`` are unchanged, while :func:`gpas_probe.model.probed_layers` finds them in
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

Nothing here imports transformers (a model of its classes cannot exist before it is imported); only
:func:`instrument` asks for it, to say which extra to install.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gpas_probe.extras import require
from gpas_probe.model.hooks import SITES, ProbedLayer, probed_layers

log = logging.getLogger(__name__)

#: The attribute of an instrumented model that holds its HFLayer objects.
ATTR = "gpas_probe_layers"
#: Where causal LMs keep their decoder layers, tried in order before the generic search.
LAYER_PATHS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers", "transformer.layers",
               "transformer.blocks", "model.language_model.layers", "language_model.model.layers", "layers", "h",
               "decoder.layers", "blocks")
ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
MLP_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe")


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


def hidden_out(value: Any) -> torch.Tensor | None:
    """A layer's output hidden states (batch, seq, hidden): the value itself or the first element of a
    tuple/list output."""
    if isinstance(value, (tuple, list)) and value:
        value = value[0]
    return value if isinstance(value, torch.Tensor) and value.dim() == 3 else None


def hidden_in(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    """A layer's input hidden states: its first positional argument or ``hidden_states=``."""
    value = args[0] if args else kwargs.get("hidden_states")
    return value if isinstance(value, torch.Tensor) and value.dim() == 3 else None


def with_hidden(args: tuple[Any, ...], kwargs: dict[str, Any], x: torch.Tensor
                ) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A layer call's arguments with its input hidden states replaced by ``x`` (see :func:`hidden_in`)."""
    if args:
        return (x, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": x}


def with_first(output: Any, x: torch.Tensor) -> Any:
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
        x = hidden_in(args, kwargs) if self._active else None
        if x is not None:
            self.hook_resid_pre(x)
            if self.layout is not None:
                self.hook_attn_shortcut(x)

    def _exit(self, _module: nn.Module, _args: Any, output: Any) -> None:
        if not self._active:
            return
        self._active = False
        y = hidden_out(output)
        if y is not None:
            self.hook_resid_post(y)

    def _attn_out(self, _module: nn.Module, _args: Any, output: Any) -> None:
        if self._active and (y := hidden_out(output)) is not None:
            self.hook_attn_out(y)

    def _mlp_out(self, _module: nn.Module, _args: Any, output: Any) -> None:
        if self._active and (y := hidden_out(output)) is not None:
            self.hook_mlp_out(y)

    def _mid(self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._active and (x := hidden_in(args, kwargs)) is not None:
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
    existing = probed_layers(model)
    if existing:
        return existing
    require("transformers", "hf", "for Hugging Face models")
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
    if not is_hf_model(model) or probed_layers(model):
        return False
    instrument(model)
    return True
