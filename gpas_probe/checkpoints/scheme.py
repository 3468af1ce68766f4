"""The normalization scheme of a checkpoint, read off its weight keys (DESIGN §5).

The GPAS paper's training code saves the HF LLaMA layout with extra keys and records the scheme
nowhere, so it is inferred per layer:

================  ==========================================================================
layer family      norm keys of ``model.layers.{l}``
================  ==========================================================================
pre               ``input_layernorm``, ``post_attention_layernorm``
sandwich          pre's two plus ``pre_feedforward_layernorm``, ``post_feedforward_layernorm``
post / deepnorm   ``post_attention_layernorm``, ``post_feedforward_layernorm``
================  ==========================================================================

``model.layers.{l}.gpas_block.gate`` marks GPAS; Mix-LN is post layers first, then pre layers. Post
and deepnorm differ only by a constant that is not stored, and LNS looks like pre: the caller says
which with ``norm=``, and any ``norm=``/``post_layers=`` given must agree with the keys.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from gpas_probe.checkpoints.layout import GATE_NAMES, NORM_KEYS
from gpas_probe.config import Family, GateGranularity, ModelConfig, NormScheme

_FAMILY_BY_NORMS = {frozenset(keys.values()): fam for fam, keys in NORM_KEYS.items()}
_GATE_SETS = {gran: frozenset(names) for gran, names in GATE_NAMES.items()}
_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)")
_NORM_KEY = re.compile(r"(\w+_layernorm)\.weight")
_GATE_KEY = re.compile(r"(gpas_\w+)\.gate")
Parts = list[tuple[frozenset[str], frozenset[str]]]


def layer_parts(keys: Iterable[str], num_layers: int) -> Parts:
    """Per layer: (norm names, gate module names) found among the keys."""
    norms: list[set[str]] = [set() for _ in range(num_layers)]
    gates: list[set[str]] = [set() for _ in range(num_layers)]
    seen: set[int] = set()
    for key in keys:
        m = _LAYER_KEY.fullmatch(key)
        if not m:
            continue
        layer, rest = int(m.group(1)), m.group(2)
        if layer >= num_layers:
            raise ValueError(f"weights for layer {layer} found, but the config has num_hidden_layers={num_layers}")
        seen.add(layer)
        if n := _NORM_KEY.fullmatch(rest):
            norms[layer].add(n.group(1))
        elif g := _GATE_KEY.fullmatch(rest):
            gates[layer].add(g.group(1))
    absent = sorted(set(range(num_layers)) - seen)
    if absent:
        raise ValueError(f"no weights for layer {absent[0]} (of num_hidden_layers={num_layers}); "
                         f"{len(absent)} layers are absent")
    return [(frozenset(n), frozenset(g)) for n, g in zip(norms, gates, strict=True)]


def _families(parts: Parts) -> list[Family]:
    out = []
    for layer, (norms, _) in enumerate(parts):
        fam = _FAMILY_BY_NORMS.get(norms)
        if fam is None:
            raise ValueError(f"layer {layer} has norm weights {sorted(norms)}, which fit no scheme "
                             f"(pre, post, sandwich, deepnorm, mixln)")
        out.append(fam)
    return out


def gate_granularity(parts: Parts) -> GateGranularity | None:
    """GPAS gate granularity shared by every layer, or None without GPAS."""
    kinds = set()
    for layer, (_, gates) in enumerate(parts):
        kind = next((g for g, names in _GATE_SETS.items() if gates == names), None)
        if gates and kind is None:
            raise ValueError(f"layer {layer} has GPAS gates {sorted(gates)}; expected gpas_block.gate "
                             f"(or gpas_attn.gate + gpas_mlp.gate)")
        kinds.add(kind)
    if len(kinds) > 1:
        raise ValueError("some layers have a GPAS gate (gpas_block.gate) and others do not")
    return kinds.pop() if kinds else None


def _scheme_of(families: list[Family]) -> tuple[NormScheme | None, int | None]:
    """The scheme the families spell (None for all-post: post and deepnorm look alike)."""
    n_post = next((i for i, f in enumerate(families) if f is not Family.POST), len(families))
    if all(f is Family.SANDWICH for f in families):
        return NormScheme.SANDWICH, None
    if all(f is Family.PRE for f in families):
        return NormScheme.PRE, None
    if n_post == len(families):
        return None, None
    if n_post > 0 and all(f is Family.PRE for f in families[n_post:]):
        return NormScheme.MIXLN, n_post
    raise ValueError(f"the layers' norm keys spell the families {[f.value for f in families]}, which fit no "
                     f"scheme (Mix-LN is post layers first, then pre layers)")


def _parse_norm(norm: str | NormScheme) -> NormScheme:
    try:
        return NormScheme(norm)
    except ValueError:
        raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(s.value for s in NormScheme)}") from None


def infer_scheme(keys: Iterable[str], num_layers: int, norm: str | NormScheme | None = None,
                 post_layers: int | None = None) -> tuple[NormScheme, int | None, bool]:
    """(scheme, Mix-LN post layers or None, GPAS present) from a checkpoint's keys.

    ``norm``/``post_layers`` override what the keys suggest (``post_layers`` alone means Mix-LN) but
    must describe the same per-layer wiring. LNS checkpoints infer as pre; pass ``norm='lns'`` or
    ``'lns-gain'``. All-post checkpoints need ``norm='post'`` or ``'deepnorm'``.
    """
    parts = layer_parts(keys, num_layers)
    families = _families(parts)
    gpas = gate_granularity(parts) is not None
    inferred, n_post = _scheme_of(families)
    if norm is None and post_layers is None:
        if inferred is None:
            raise ValueError("every layer is post-norm, which fits both post and deepnorm (DeepNorm's shortcut "
                             "multiplier is not stored in the weights); pass norm='post' or norm='deepnorm' "
                             "(CLI: --norm post|deepnorm)")
        return inferred, n_post, gpas

    scheme = NormScheme.MIXLN if norm is None else _parse_norm(norm)
    if post_layers is not None and scheme is not NormScheme.MIXLN:
        raise ValueError(f"post_layers applies only to norm='mixln', not norm='{scheme}'")
    if scheme is NormScheme.MIXLN and post_layers is None:
        post_layers = n_post if inferred is NormScheme.MIXLN else sum(f is Family.POST for f in families)
    expected = ModelConfig(num_layers=num_layers, norm=scheme, post_layers=post_layers)
    for layer, fam in enumerate(families):
        if expected.family(layer) is not fam:
            what = f"norm='{scheme}'" + (f", post_layers={post_layers}" if scheme is NormScheme.MIXLN else "")
            raise ValueError(f"{what} does not match the checkpoint: layer {layer} has "
                             f"{sorted(parts[layer][0])} (a {fam.value} layer), {what} implies a "
                             f"{expected.family(layer).value} layer")
    return scheme, (post_layers if scheme is NormScheme.MIXLN else None), gpas
