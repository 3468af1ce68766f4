"""The profile of one model on evaluation data, in one pass over the batches: for each batch one forward
(and, for the statistics or the deletion estimate, one backward), from which every probe statistic is
pooled as one recorded step and every layer-importance analysis is read (rows in the store's schema, see
:mod:`gpas_probe.profile`).

The forward is captured layer by layer (:class:`~gpas_probe.analysis.passes.LayerCapture`): angular
distance and block influence read its states, exact deletion replays only the layers after each deleted
one on them, and the first-order deletion estimate comes from the backward that the statistics make
anyway. No analysis runs a full forward of its own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from types import SimpleNamespace
from typing import Any

import pandas as pd
import torch
from torch import nn

from gpas_probe.analysis import to_long
from gpas_probe.analysis.passes import LayerCapture, summed_loss
from gpas_probe.analysis.streaming import ImportanceSums, unpack_batch
from gpas_probe.evaldata import EvalData
from gpas_probe.model.adapter import hidden_in, with_hidden
from gpas_probe.probes import FAMILIES, Driver, Probe, ProbeConfig
from gpas_probe.profile.config import ProfileConfig
from gpas_probe.profile.targets import Target, target_for
from gpas_probe.store.schema import as_table_frame

log = logging.getLogger(__name__)

#: The frames of an importance pass, in the order they are written.
_FRAMES = ("deletion", "base", "estimate", "block_influence", "angular")


def profile_probe(model: nn.Module, config: ProfileConfig, run_id: str,
                  stats: tuple[str, ...] = FAMILIES) -> Probe:
    """The probe a profile arms on ``model``: ``stats`` pooled over every batch as one step, with intervals."""
    measure = config.measure
    probes = ProbeConfig(every=1, stats=stats, intervals=True, skip_first_position=measure.skip_first_position,
                         outlier_factor=measure.outlier_factor)
    return Probe(model, config=probes, schedule=lambda s: True, run_id=run_id, driver=Driver.for_profile())


def importance_sums(config: ProfileConfig, num_layers: int) -> ImportanceSums:
    """The importance sums of a profile of ``num_layers`` layers: deletion as measured, angular distance and
    block influence."""
    m = config.measure
    return ImportanceSums(num_layers, deletion=m.exact, angular=True, influence=True, estimate=m.estimate,
                          skip_first_position=m.skip_first_position)


def importance_rows(sums: ImportanceSums, run_id: str, step: int) -> list[pd.DataFrame]:
    """The long-table rows of the importance ``sums`` of every batch."""
    sums.check()
    result = sums.frames(normalize_rows=True)
    return [to_long(result[k], run_id, step) for k in _FRAMES if k in result]


@contextmanager
def _activation_gradients_only(model: nn.Module, first: nn.Module) -> Iterator[None]:
    """A backward that computes no parameter gradient: parameters are frozen and the first layer's input
    is made a leaf that requires one, so gradients flow through the layers to it alone."""
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)

    def leaf(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        x = hidden_in(args, kwargs)
        return None if x is None or not torch.is_grad_enabled() else with_hidden(args, kwargs,
                                                                                 x.detach().requires_grad_())

    handle = first.register_forward_pre_hook(leaf, with_kwargs=True, prepend=True)
    try:
        yield
    finally:
        handle.remove()
        for p in frozen:
            p.requires_grad_(True)


def _one_pass(target: Target, data: EvalData, config: ProfileConfig, step: int, run_id: str,
              on_batch: Callable[[], None] | None) -> list[pd.DataFrame]:
    """Every batch once: statistics (pooled as one probe step, gradients of the token-mean loss over all
    batches) and importance sums; returns the frames."""
    model, measure, sizes = target.model, config.measure, config.evaluation.sizes
    n_targets, sequences = data.num_targets(*sizes), 0
    device = next(model.parameters()).device
    backward = measure.activations or measure.estimate
    sums = importance_sums(config, len(target.layers())) if measure.importance else None
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    layers = target.layers()
    model.zero_grad(set_to_none=True)
    with ExitStack() as stack:
        if backward and not measure.activations:  # the estimate alone: activation gradients only
            stack.enter_context(_activation_gradients_only(model, layers[0]))
        probe = stack.enter_context(profile_probe(model, config, run_id)) if measure.activations else None
        if probe is not None:
            probe.begin_step(step)
        for batch in data.batches(*sizes):
            input_ids, labels, mask = unpack_batch(batch, device)
            sequences += len(input_ids)
            if probe is not None:
                probe.set_exclude_mask(~mask)
                probe.set_tokens(input_ids)
            capture = LayerCapture(layers, estimate=measure.estimate, scale=n_targets) if sums else None
            with capture or nullcontext(), torch.enable_grad() if backward else torch.no_grad():
                logits = target.logits(input_ids)
                loss = summed_loss(logits, labels)
                if backward:
                    (loss / n_targets).backward()
            loss_sum += loss.detach().double()
            if sums is not None and capture is not None:
                target.add_pass(capture, input_ids, labels, mask, logits.detach(), sums)
                sums.end_batch()
            del logits, loss, capture
            if on_batch is not None:
                on_batch()
        frames = []
        if probe is not None:
            probe.after_backward(step)
            val_loss = float(loss_sum) / n_targets
            probe.end_step(SimpleNamespace(step=step, val_loss=None if sums else val_loss, tokens=n_targets,
                                           sequences=sequences))
            frame = probe.frame()
            frames.append(frame[frame["stat"] != "update_ratio"])
    model.zero_grad(set_to_none=True)
    if sums is not None:
        frames += importance_rows(sums, run_id, step)
    return frames


def profile_model(model: nn.Module, data: EvalData, config: ProfileConfig | None = None, *, step: int = 0,
                  run_id: str = "profile", on_batch: Callable[[str], None] | None = None) -> pd.DataFrame:
    """The profile rows of one model as a frame of the store's columns, all at ``step``.

    ``model`` is ours or a Hugging Face causal LM (instrumented for the call, :mod:`gpas_probe.hf`).
    ``data`` must fit the model (:meth:`EvalData.check_vocab`); ``config`` gives the batch sizes
    (``evaluation``) and what is measured (``measure``); its ``evaluation.data`` and ``loading`` are
    what made ``data`` and ``model`` and are not read here. ``on_batch("profile")`` is called after each
    batch."""
    config = config or ProfileConfig()
    target = target_for(model)
    data.check_vocab(model.config.vocab_size)
    max_len = target.max_len()
    config, _ = config.with_seq_len(None, max_len)
    sizes = config.evaluation.sizes
    if max_len is not None and sizes[1] > max_len:
        log.warning("seq_len %d exceeds the model's max_position_embeddings %d", sizes[1], max_len)
    was_training = model.training
    model.eval()
    try:
        with target.probed():
            done = (lambda: on_batch("profile")) if on_batch else None
            frames = _one_pass(target, data, config, step, run_id, done)
    finally:
        model.train(was_training)
    return as_table_frame(pd.concat(frames, ignore_index=True))
