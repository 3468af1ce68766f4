"""Models under ``torchrun``: wrapping for DDP or FSDP2, full state dicts for checkpoints, the optimizer
state in one format for every mode, and the global gradient norm (see :mod:`gpas_probe.distributed`)."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from gpas_probe.distributed.context import DistContext
from gpas_probe.gpas import gate_parameters


def replicated_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters FSDP leaves unsharded: the scalar GPAS gates."""
    return list(gate_parameters(model))


def wrap_model(model: nn.Module, ctx: DistContext) -> nn.Module:
    """The module to run forward/backward through: DDP around ``model``, or ``model`` itself sharded
    in place with FSDP2 (one unit per decoder layer plus the root), or ``model`` unchanged."""
    if ctx.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    if ctx.mode == "fsdp":
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:  # torch < 2.6
            from torch.distributed._composable.fsdp import fully_shard
        ignored = set(replicated_parameters(model))
        if ignored and "ignored_params" not in inspect.signature(fully_shard).parameters:
            raise ValueError(f"--dist fsdp with GPAS gates needs fully_shard(ignored_params=...), which torch "
                             f"{torch.__version__} lacks; use --dist ddp or a newer torch")
        kw = {"ignored_params": ignored} if ignored else {}
        for block in getattr(model, "layers", []):
            fully_shard(block, **kw)
        fully_shard(model, **kw)
        return model
    return model


def param_names(model: nn.Module) -> dict[int, str]:
    """id(parameter) -> its first fully qualified name (a shared parameter has several)."""
    return {id(p): name for name, p in model.named_parameters()}


def full_model_state(model: nn.Module, ctx: DistContext) -> dict[str, torch.Tensor] | None:
    """FSDP: the full (unsharded) state dict on CPU, on rank 0 (collective: every rank calls it).
    Other modes: None (the parameters are whole already)."""
    if ctx.mode != "fsdp":
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, ctx: DistContext) -> dict[str, Any]:
    """The optimizer state in ``torch.optim``'s index-keyed format (FSDP: gathered, valid on rank 0;
    collective)."""
    if ctx.mode != "fsdp":
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    full = get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not ctx.is_main:
        return {}
    index: dict[str, int] = {}
    groups = []
    for group in full["param_groups"]:
        ids = []
        for name in group["params"]:
            index.setdefault(name, len(index))
            ids.append(index[name])
        groups.append({**group, "params": ids})
    return {"state": {index[name]: s for name, s in full["state"].items()}, "param_groups": groups}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
                         ctx: DistContext) -> None:
    """Load an index-keyed optimizer state (every rank holds the full one); FSDP shards it."""
    if ctx.mode != "fsdp":
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = param_names(model)
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    saved = [i for g in state["param_groups"] for i in g["params"]]
    if len(saved) != len(order):
        raise ValueError(f"the saved optimizer state covers {len(saved)} parameters, the model has {len(order)}")
    name_of = dict(zip(saved, order, strict=True))
    groups = [{**g, "params": [name_of[i] for i in g["params"]]} for g in state["param_groups"]]
    fqn_state = {"state": {name_of[int(i)]: s for i, s in state["state"].items()}, "param_groups": groups}
    set_optimizer_state_dict(model, optimizer, fqn_state, options=StateDictOptions(full_state_dict=True))


def clip_grad_norm(params: list[nn.Parameter], max_norm: float, ctx: DistContext) -> float:
    """The global gradient norm before clipping (over full tensors under FSDP), clipping to ``max_norm``."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    full = getattr(norm, "full_tensor", None)
    return float(full() if callable(full) else norm)
