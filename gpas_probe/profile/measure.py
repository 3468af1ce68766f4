"""The profile of one model on evaluation data: every probe statistic pooled over all batches as one
recorded step, then layer importance (rows in the store's schema, see :mod:`gpas_probe.profile`)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from types import SimpleNamespace
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from gpas_probe.analysis import to_long
from gpas_probe.evaldata import EvalData
from gpas_probe.model import IGNORE_INDEX
from gpas_probe.probes import FAMILIES, Probe, ProbeConfig
from gpas_probe.profile.config import ProfileConfig
from gpas_probe.profile.targets import Target, target_for
from gpas_probe.store.schema import as_table_frame

log = logging.getLogger(__name__)


def _counted(batches: Iterable[Any], on_batch: Callable[[], None] | None) -> Iterator[Any]:
    for batch in batches:
        yield batch
        if on_batch is not None:
            on_batch()  # the consumer asked for the next batch: this one is done


def _probe_frame(target: Target, data: EvalData, step: int, run_id: str, config: ProfileConfig,
                 on_batch: Callable[[], None] | None) -> pd.DataFrame:
    """One probe step pooled over every batch; gradients of the token-mean loss over all of them."""
    model = target.model
    sizes, measure = config.evaluation.sizes, config.measure
    n_targets, sequences = data.num_targets(*sizes), 0
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    probes = ProbeConfig(every=1, stats=FAMILIES, intervals=True, skip_first_position=measure.skip_first_position,
                         outlier_factor=measure.outlier_factor)
    try:
        with torch.enable_grad(), Probe(model, config=probes, schedule=lambda s: True, run_id=run_id) as probe:
            probe.begin_step(step)
            for input_ids, labels, mask in _counted(data.batches(*sizes), on_batch):
                input_ids, labels, mask = input_ids.to(device), labels.to(device), mask.to(device)
                probe.set_exclude_mask(~mask)
                probe.set_tokens(input_ids)
                sequences += len(input_ids)
                logits = target.logits(input_ids)
                loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                                       reduction="sum")
                (loss / n_targets).backward()
                loss_sum += loss.detach().double()
                del logits, loss
            val_loss = float(loss_sum) / n_targets
            probe.end_step(SimpleNamespace(step=step, val_loss=val_loss if not measure.importance else None,
                                           tokens=n_targets, sequences=sequences))
            frame = probe.frame()
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return frame[frame["stat"] != "update_ratio"]


def profile_model(model: nn.Module, data: EvalData, config: ProfileConfig | None = None, *, step: int = 0,
                  run_id: str = "profile", on_batch: Callable[[str], None] | None = None) -> pd.DataFrame:
    """The profile rows of one model as a frame of the store's columns, all at ``step``.

    ``model`` is ours or a Hugging Face causal LM (instrumented for the call, :mod:`gpas_probe.hf`).
    ``data`` must fit the model (:meth:`EvalData.check_vocab`); ``config`` gives the batch sizes
    (``evaluation``) and what is measured (``measure``); its ``evaluation.data`` and ``loading`` are
    what made ``data`` and ``model`` and are not read here. ``on_batch(phase)`` is called after each
    batch of each pass (``"activations"``, then ``"importance"``)."""
    config = config or ProfileConfig()
    target = target_for(model)
    data.check_vocab(model.config.vocab_size)
    sizes = config.evaluation.sizes
    max_len = target.max_len()
    if max_len is not None and sizes[1] > max_len:
        log.warning("seq_len %d exceeds the model's max_position_embeddings %d", sizes[1], max_len)
    measure = config.measure
    frames = []
    with target.probed():
        if measure.activations:
            done = (lambda: on_batch("activations")) if on_batch else None
            frames.append(_probe_frame(target, data, step, run_id, config, done))
        if measure.importance:
            done = (lambda: on_batch("importance")) if on_batch else None
            result = target.importance(_counted(data.batches(*sizes), done), measure.skip_first_position)
            frames += [to_long(result[k], run_id, step) for k in ("deletion", "block_influence", "angular")]
    return as_table_frame(pd.concat(frames, ignore_index=True))
