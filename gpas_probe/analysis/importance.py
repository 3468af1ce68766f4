"""Layer importance (DESIGN §6, §8.9): deletion importance, angular distances, block influence.

All analyses are pure functions of a model and an iterable of batches ``(input_ids, labels)`` or
``(input_ids, labels, mask)``. ``labels`` are the targets aligned with the inputs (already shifted);
``IGNORE_INDEX`` (-100) marks positions without a target, including right padding. Batches are
streamed: one batch's states are alive at a time and only per-layer sums are kept, so memory does
not grow with the number of batches.

Which positions count as tokens (block influence) and which is a sequence's last token (angular
distance): the optional third element ``mask`` (bool, ``(B, T)``, true on real tokens) when given,
otherwise the positions whose label is not ``IGNORE_INDEX``. With right padding and shifted labels
the latter leaves out each sequence's final real input token (it has no target); pass ``mask`` to
include it. Position 0 is included.

Hidden states ``h_l`` are the residual stream entering decoder layer ``l``: ``h_0`` is the token
embedding and ``h_L`` the last layer's output before the final norm.

- Deletion importance (the paper's convention): deleting layer ``l`` skips it, so layer ``l + 1``
  receives ``h_l`` and every later layer keeps its weights. ``delta`` is the token-weighted mean
  validation loss with the layer deleted minus the same loss of the full model. The pass reuses the
  unchanged prefix: ``h_l`` comes from the single full forward, and only layers ``l+1..L-1`` are
  re-run, ``L(L-1)/2`` block calls per batch instead of ``L(L-1)`` for delete-and-rerun.
- Angular distance (Gromov et al. 2024, Mix-LN): ``arccos(cos(h_l, h_{l+n})) / pi`` at each
  sequence's last token, averaged over sequences, for every start ``l`` and block size ``n`` with
  ``l + n <= L``. Per-row normalization (``normalize_rows=True``) min-max scales each block size
  ``n`` across starts ``l`` to [0, 1]: ``(d - min_l d) / (max_l d - min_l d)``; a row whose
  distances are all equal (for instance ``n = L``, which has one start) is set to 0.
- Block influence (ShortGPT): ``1 - cos(h_l, h_{l+1})`` averaged over all tokens.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from gpas_probe.model import IGNORE_INDEX, Transformer

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, ...]
ModelSource = Transformer | Callable[[], Transformer]

#: Column sets of the frames this module returns, used by :func:`to_long` to recognise them.
DELETION_COLUMNS = ("layer", "loss_deleted", "base_loss", "delta")
ANGULAR_COLUMNS = ("layer", "n", "distance")
INFLUENCE_COLUMNS = ("layer", "influence")
LONG_COLUMNS = ("run_id", "step", "layer", "site", "direction", "stat", "value")


# --------------------------------------------------------------------------------------------- batches


def _unpack(batch: Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, labels, mask)`` on ``device``; the mask defaults to ``labels != IGNORE_INDEX``."""
    if len(batch) not in (2, 3):
        raise ValueError(f"a batch is (input_ids, labels) or (input_ids, labels, mask), got {len(batch)} items")
    input_ids, labels = batch[0].to(device), batch[1].to(device)
    if input_ids.ndim != 2 or labels.shape != input_ids.shape:
        raise ValueError(f"input_ids and labels must both be (B, T), got {tuple(input_ids.shape)} "
                         f"and {tuple(labels.shape)}")
    mask = batch[2].to(device).bool() if len(batch) == 3 else labels != IGNORE_INDEX
    if mask.shape != input_ids.shape:
        raise ValueError(f"mask must be (B, T) like input_ids, got {tuple(mask.shape)}")
    return input_ids, labels, mask


def _embed(model: Transformer, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = model.embed_tokens(input_ids)
    cos, sin = model.rotary(input_ids.shape[1], x.dtype)
    return x, cos, sin


def _loss_sum(model: Transformer, h: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """Summed cross-entropy and token count of the head applied to pre-norm states ``h``.

    The head runs only at positions with a target: the norm and head act per token, so this equals
    the model's own loss on those positions."""
    keep = labels != IGNORE_INDEX
    n = int(keep.sum())
    if n == 0:
        return 0.0, 0
    logits = model.lm_head(model.norm(h[keep]))
    return float(F.cross_entropy(logits.float(), labels[keep], reduction="sum")), n


def _last_index(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows with any real token, index of each such row's last real token)."""
    T = mask.shape[1]
    rows = mask.any(dim=1).nonzero().squeeze(1)
    last = T - 1 - mask[rows].flip(1).int().argmax(dim=1)
    return rows, last


def forward_skipping(model: Transformer, input_ids: torch.Tensor, skip: Iterable[int] = ()) -> torch.Tensor:
    """Pre-final-norm hidden states of the model with the layers in ``skip`` deleted (skipped)."""
    skip = set(skip)
    x, cos, sin = _embed(model, input_ids)
    for layer, block in enumerate(model.layers):
        if layer not in skip:
            x = block(x, cos, sin)
    return x


# ------------------------------------------------------------------------------------------ one pass


@dataclass
class _Sums:
    """Running sums of one streamed pass; nothing here grows with the number of batches."""

    num_layers: int
    deletion: bool
    angular: bool
    influence: bool
    base_loss: float = 0.0
    tokens: int = 0
    deleted_loss: list[float] = field(default_factory=list)
    angle_sum: torch.Tensor | None = None  # (L+1, L+1): sum over sequences of arccos(cos(h_i, h_j))/pi
    sequences: int = 0
    cos_sum: list[float] = field(default_factory=list)
    mask_tokens: int = 0

    def __post_init__(self) -> None:
        L = self.num_layers
        self.deleted_loss = [0.0] * L
        self.cos_sum = [0.0] * L
        if self.angular:
            self.angle_sum = torch.zeros(L + 1, L + 1, dtype=torch.float64)


def _update(model: Transformer, batch: Batch, sums: _Sums, device: torch.device) -> None:
    input_ids, labels, mask = _unpack(batch, device)
    rows, last = _last_index(mask)
    x, cos, sin = _embed(model, input_ids)
    layers = model.layers
    last_states = []  # h_l at each sequence's last token, for the angular distances
    for layer, block in enumerate(layers):
        if sums.deletion:
            y = x  # deleting `layer`: the later layers start from its input, the unchanged prefix
            for later in layers[layer + 1:]:
                y = later(y, cos, sin)
            s, _ = _loss_sum(model, y, labels)
            sums.deleted_loss[layer] += s
        if sums.angular:
            last_states.append(x[rows, last].double())
        out = block(x, cos, sin)
        if sums.influence:
            sums.cos_sum[layer] += float(F.cosine_similarity(x[mask].double(), out[mask].double(), dim=-1).sum())
        x = out
    s, n = _loss_sum(model, x, labels)
    sums.base_loss += s
    sums.tokens += n
    sums.mask_tokens += int(mask.sum())
    if sums.angular and len(rows):
        last_states.append(x[rows, last].double())
        u = F.normalize(torch.stack(last_states, dim=1), dim=-1)  # (B', L+1, hidden)
        gram = (u @ u.transpose(1, 2)).clamp(-1.0, 1.0)
        assert sums.angle_sum is not None
        sums.angle_sum += (torch.arccos(gram) / math.pi).sum(0).cpu()
        sums.sequences += len(rows)


def _accumulate(model: nn.Module, batches: Iterable[Batch], num_layers: int,
                update: Callable[[Batch, _Sums, torch.device], None], *, deletion: bool = False,
                angular: bool = False, influence: bool = False) -> _Sums:
    """Stream ``batches`` through ``update`` in eval and inference mode, then check that they had data.
    Shared by our model (:func:`_update`) and Hugging Face models (``gpas_probe.hf``)."""
    sums = _Sums(num_layers, deletion, angular, influence)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in batches:
                update(batch, sums, device)
    finally:
        model.train(was_training)
    if deletion and sums.tokens == 0:
        raise ValueError("no batch has a target token (every label is -100)")
    if angular and sums.sequences == 0:
        raise ValueError("no batch has a sequence with a real token")
    if influence and sums.mask_tokens == 0:
        raise ValueError("no batch has a real token")
    return sums


def _run(model: Transformer, batches: Iterable[Batch], **flags: bool) -> _Sums:
    return _accumulate(model, batches, len(model.layers), lambda b, s, d: _update(model, b, s, d), **flags)


# ---------------------------------------------------------------------------------------- the frames


def _deletion_frame(sums: _Sums) -> pd.DataFrame:
    base = sums.base_loss / sums.tokens
    deleted = [s / sums.tokens for s in sums.deleted_loss]
    return pd.DataFrame({
        "layer": range(sums.num_layers), "loss_deleted": deleted, "base_loss": base,
        "delta": [d - base for d in deleted],
    })


def _angular_frame(sums: _Sums, normalize_rows: bool) -> pd.DataFrame:
    assert sums.angle_sum is not None
    mean = sums.angle_sum / sums.sequences
    L = sums.num_layers
    records = []
    for n in range(1, L + 1):
        row = mean.diagonal(offset=n)  # row[l] = distance(h_l, h_{l+n}), l = 0..L-n
        records.extend({"layer": layer, "n": n, "distance": float(d)} for layer, d in enumerate(row))
    df = pd.DataFrame.from_records(records, columns=list(ANGULAR_COLUMNS))
    if normalize_rows:
        df["distance_norm"] = df.groupby("n")["distance"].transform(_min_max)
    return df


def _min_max(d: pd.Series) -> pd.Series:
    lo, hi = d.min(), d.max()
    return (d - lo) / (hi - lo) if hi > lo else d * 0.0


def _influence_frame(sums: _Sums) -> pd.DataFrame:
    return pd.DataFrame({
        "layer": range(sums.num_layers), "influence": [1.0 - c / sums.mask_tokens for c in sums.cos_sum],
    })


def deletion_importance(model: Transformer, batches: Iterable[Batch]) -> pd.DataFrame:
    """Loss increase when each decoder layer is deleted, reusing the unchanged prefix.

    Returns columns ``layer``, ``loss_deleted``, ``base_loss``, ``delta = loss_deleted - base_loss``;
    losses are means over every target token of every batch."""
    return _deletion_frame(_run(model, batches, deletion=True))


def naive_deletion_importance(model: Transformer, batches: Iterable[Batch]) -> pd.DataFrame:
    """The delete-and-rerun reference of :func:`deletion_importance`: one full forward per layer."""
    device = next(model.parameters()).device
    L = len(model.layers)
    deleted, base, tokens = [0.0] * L, 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in batches:
                input_ids, labels, _ = _unpack(batch, device)
                s, n = _loss_sum(model, forward_skipping(model, input_ids), labels)
                base, tokens = base + s, tokens + n
                for layer in range(L):
                    deleted[layer] += _loss_sum(model, forward_skipping(model, input_ids, [layer]), labels)[0]
    finally:
        model.train(was_training)
    if tokens == 0:
        raise ValueError("no batch has a target token (every label is -100)")
    sums = _Sums(L, True, False, False, base_loss=base, tokens=tokens)
    sums.deleted_loss = deleted
    return _deletion_frame(sums)


def angular_distances(model: Transformer, batches: Iterable[Batch], normalize_rows: bool = False) -> pd.DataFrame:
    """Mean angular distance ``arccos(cos(h_l, h_{l+n}))/pi`` at each sequence's last token.

    Long format: ``layer`` (start ``l``), ``n`` (block size, ``1..L-l``), ``distance``; with
    ``normalize_rows`` also ``distance_norm``, each ``n`` min-max scaled across ``l`` (module doc)."""
    return _angular_frame(_run(model, batches, angular=True), normalize_rows)


def block_influence(model: Transformer, batches: Iterable[Batch]) -> pd.DataFrame:
    """ShortGPT's block influence ``1 - cos(layer input, layer output)``, averaged over all tokens.

    Columns ``layer``, ``influence``."""
    return _influence_frame(_run(model, batches, influence=True))


def layer_importance(model: Transformer, batches: Iterable[Batch],
                     normalize_rows: bool = False) -> dict[str, pd.DataFrame]:
    """All three analyses in one streamed pass: keys ``deletion``, ``angular``, ``block_influence``."""
    return _frames(_run(model, batches, deletion=True, angular=True, influence=True), normalize_rows)


def _frames(sums: _Sums, normalize_rows: bool) -> dict[str, pd.DataFrame]:
    return {"deletion": _deletion_frame(sums), "angular": _angular_frame(sums, normalize_rows),
            "block_influence": _influence_frame(sums)}


# ------------------------------------------------------------------------------------ over training

_STEP_DIR = re.compile(r"step_(\d+)$")


def checkpoint_sources(path: str | Path) -> list[tuple[int, Callable[[], Transformer]]]:
    """``(step, loader)`` for each step checkpoint of a run directory (``checkpoints/step_*``) or of a
    folder holding ``step_*`` checkpoint directories, oldest first. Nothing is loaded yet."""
    from gpas_probe.checkpoint import CONFIG_NAME, find_checkpoints, load_checkpoint

    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {p}")
    found = find_checkpoints(p) or sorted(
        d for d in p.iterdir() if d.is_dir() and _STEP_DIR.search(d.name) and (d / CONFIG_NAME).is_file()
    )
    if not found:
        raise FileNotFoundError(f"{p}: no step_* checkpoints here or under {p / 'checkpoints'}")
    out = []
    for d in found:
        match = _STEP_DIR.search(d.name)
        assert match is not None
        out.append((int(match.group(1)), lambda d=d: load_checkpoint(d)))
    return sorted(out, key=lambda s: s[0])


def importance_over_training(
    checkpoints: str | Path | Sequence[tuple[int, ModelSource]],
    batches_factory: Callable[[], Iterable[Batch]],
    analysis: Callable[[Transformer, Iterable[Batch]], pd.DataFrame] = deletion_importance,
) -> pd.DataFrame:
    """``analysis`` of each checkpoint, with a leading ``step`` column.

    ``checkpoints`` is a run directory / folder of step checkpoints, or ``(step, model)`` pairs where
    the model may be a zero-argument loader; loaders are called one at a time, so one model is in
    memory at once. ``batches_factory`` returns a fresh iterable of batches for each checkpoint."""
    sources = checkpoint_sources(checkpoints) if isinstance(checkpoints, (str, Path)) else list(checkpoints)
    if not sources:
        raise ValueError("no checkpoints given")
    frames = []
    for step, source in sources:
        model = source if isinstance(source, torch.nn.Module) else source()
        log.info("layer importance at step %d", step)
        df = analysis(model, batches_factory())
        df.insert(0, "step", int(step))
        frames.append(df)
        del model
    return pd.concat(frames, ignore_index=True)


# ----------------------------------------------------------------------------------------- long form


def to_long(df: pd.DataFrame, run_id: str, step: int | None = None) -> pd.DataFrame:
    """Any frame of this module in the long probe schema (DESIGN §7).

    Deletion: ``site='importance'``, stats ``deletion_delta`` and ``deletion_loss``, plus the base
    loss as ``layer=-1, site='model', stat='val_loss'``. Block influence: ``site='importance'``,
    stat ``block_influence``. Angular distance: ``site=f'angular_n{n}'``, stat ``angular_distance``
    (and ``angular_distance_norm``). ``direction`` is ``'none'``. The step comes from a ``step``
    column when present (see :func:`importance_over_training`), else from ``step``."""
    cols = set(df.columns) - {"step"}
    if "step" in df.columns:
        steps = df["step"]
    elif step is not None:
        steps = pd.Series(step, index=df.index)
    else:
        raise ValueError("to_long needs a step: pass step= or a frame with a 'step' column")
    parts: list[pd.DataFrame] = []

    def add(layer: pd.Series, site: pd.Series | str, stat: str, value: pd.Series, step_: pd.Series) -> None:
        parts.append(pd.DataFrame({"step": step_.to_numpy(), "layer": layer.to_numpy(),
                                   "site": site if isinstance(site, str) else site.to_numpy(),
                                   "stat": stat, "value": value.to_numpy()}))

    if cols == set(DELETION_COLUMNS):
        add(df["layer"], "importance", "deletion_delta", df["delta"], steps)
        add(df["layer"], "importance", "deletion_loss", df["loss_deleted"], steps)
        base = pd.DataFrame({"step": steps, "base_loss": df["base_loss"]}).drop_duplicates("step")
        add(pd.Series(-1, index=base.index), "model", "val_loss", base["base_loss"], base["step"])
    elif cols == set(INFLUENCE_COLUMNS):
        add(df["layer"], "importance", "block_influence", df["influence"], steps)
    elif cols in (set(ANGULAR_COLUMNS), set(ANGULAR_COLUMNS) | {"distance_norm"}):
        site = "angular_n" + df["n"].astype(int).astype(str)
        add(df["layer"], site, "angular_distance", df["distance"], steps)
        if "distance_norm" in cols:
            add(df["layer"], site, "angular_distance_norm", df["distance_norm"], steps)
    else:
        raise ValueError(f"not a layer-importance frame: columns {sorted(df.columns)}")
    out = pd.concat(parts, ignore_index=True)
    out.insert(0, "run_id", run_id)
    out["direction"] = "none"
    return out.astype({"run_id": str, "step": "int64", "layer": "int16", "site": str,
                       "direction": str, "stat": str, "value": "float64"})[list(LONG_COLUMNS)]
