"""Data-parallel training under ``torchrun``: DDP or FSDP2 (``fully_shard``); gloo on CPU, NCCL on CUDA.

Launch::

    torchrun --nproc_per_node 2 -m gpas_probe.cli.main train --dist ddp ...     # or --dist fsdp

Each of the ``W`` ranks trains on its own slice of one global batch of ``batch_size * W`` rows
(:meth:`gpas_probe.data.Batches.train`), so a run on ``W`` processes computes what one process
computes with ``batch_size * W`` rows (to float rounding): every rank's loss is the mean over the
same number of tokens, and DDP and FSDP average the gradients, so the mean of the ranks' losses is
the global mean.

What is reduced, and how:

- the reported loss and the validation loss: the mean over ranks (one all-reduce per step);
- probe statistics: sums (SUM) and maxima (MAX) of every rank, flattened into one tensor each, are
  all-reduced once per recorded step before the single copy to the host
  (:meth:`DistContext.all_reduce_stats`); parameter statistics of FSDP's sharded parameters are
  partial sums of the local shards and are summed the same way; replicated values (DDP gradients
  after DDP's all-reduce, GPAS gates) are taken as they are;
- activation gradients (the probes' ``bwd`` rows) are scaled by ``1 / W`` before their statistics
  are taken: each rank's loss is its own mean and the global loss the mean of those;
- parameter gradients are read after the backward pass, once DDP/FSDP have reduced them (not in
  post-accumulate-grad hooks, which see a rank's own gradient), and before clipping; the global
  gradient norm is the one ``clip_grad_norm_`` computes over the full (DTensor) gradients;
- FSDP: the scalar GPAS gates cannot be sharded (``fully_shard`` refuses 0-d parameters), so they
  are left out of sharding (``ignored_params``), kept replicated, and their gradients are averaged
  over ranks here (:meth:`DistContext.average_replicated_grads`) before anything reads them.

Errors: bad input is found on every rank at the same point (checks of rank 0 alone, such as the
run folder's, are broadcast by :meth:`DistContext.on_main`; per-rank checks are agreed on by
:meth:`DistContext.agree`), so every rank stops together with the same error, which rank 0 reports.

Only rank 0 writes (parquet chunks, ``run.json``, checkpoints). Checkpoints are gathered into a full
state dict (:func:`full_model_state`) and saved in the single-process format, so a checkpoint saved
from FSDP loads in one process, and the optimizer state is stored in ``torch.optim``'s own
(index-keyed) format whatever the mode, so a run may be resumed under any mode with the same number
of processes.

Modules: ``context`` (this process's place in a run, collectives, errors every rank raises together)
and ``parallel`` (DDP/FSDP2 models, their state and gradients).
"""

from gpas_probe.distributed.context import (
    DIST_MODES,
    TORCHRUN_ENV,
    DistContext,
    check_launch,
    distributed,
    init_distributed,
    is_sharded,
    key_checksum,
    local,
    mark_quiet,
    mark_shared,
    torchrun_world_size,
)
from gpas_probe.distributed.parallel import (
    clip_grad_norm,
    full_model_state,
    load_optimizer_state,
    optimizer_state,
    param_names,
    replicated_parameters,
    wrap_model,
)

__all__ = [
    "DIST_MODES", "TORCHRUN_ENV", "DistContext", "check_launch", "clip_grad_norm", "distributed",
    "full_model_state", "init_distributed", "is_sharded", "key_checksum", "load_optimizer_state", "local",
    "mark_quiet", "mark_shared", "optimizer_state", "param_names", "replicated_parameters", "torchrun_world_size",
    "wrap_model",
]
