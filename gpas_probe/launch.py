"""From command-line options to configurations: what ``gpas-probe train`` builds, checked here so that
every bad value is one ``ValueError`` line (and, under ``torchrun``, the same error on every rank)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

from gpas_probe.config import GateGranularity, ModelConfig, NormScheme, ScalingMode, TrainConfig, get_preset
from gpas_probe.distributed import DistContext, mark_quiet, mark_shared
from gpas_probe.probes import FAMILIES, ProbeConfig

E = TypeVar("E", bound=Enum)

#: TrainConfig fields ``gpas-probe train`` takes as options (None: the preset's value).
TRAIN_FIELDS = ("steps", "lr", "warmup", "batch_size", "seq_len", "seed", "data", "checkpoint_every", "eval_every",
                "grad_clip", "gate_clip", "device", "compile")


def parse_choice(value: str | E, enum: type[E], what: str) -> E:
    """``value`` as a member of ``enum``, or a one-line error listing the choices."""
    if isinstance(value, enum):
        return value
    try:
        return enum(value)
    except ValueError:
        raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(m.value for m in enum)}") from None


def probe_config(every: int, schedule: str = "every", stats: str = ",".join(FAMILIES)) -> ProbeConfig | None:
    """The CLI's probe options as a ProbeConfig; ``every == 0`` with the 'every' schedule turns probes off."""
    if every == 0 and schedule == "every":
        return None
    return ProbeConfig(every=every, schedule=schedule, stats=tuple(s.strip() for s in stats.split(",") if s.strip()))


@dataclass
class TrainOptions:
    """The options of ``gpas-probe train`` as given; ``None`` means the preset's value."""

    preset: str = "small"
    norm: str = "pre"
    gpas: bool = False
    gate: str = "layer"
    naive: bool = False
    fixed_gate: float | None = None
    post_layers: int | None = None
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields; a None value means the preset's
    probe_every: int = 10
    probe_schedule: str = "every"
    probe_stats: str = ",".join(FAMILIES)
    out: Path | None = None

    def model_config(self) -> ModelConfig:
        """The model: the preset's, with the scheme and GPAS options."""
        norm = parse_choice(self.norm, NormScheme, "scheme")
        kw: dict[str, Any] = {"gpas_granularity": parse_choice(self.gate, GateGranularity, "gate")}
        if self.post_layers is not None:
            kw["post_layers"] = self.post_layers
        if self.naive:
            kw["gpas_mode"] = ScalingMode.NAIVE
        if self.fixed_gate is not None:
            kw.update(gpas_learnable=False, gpas_init=self.fixed_gate)
        return ModelConfig.from_preset(self.preset, norm=norm, gpas=self.gpas or self.naive, **kw)

    def train_config(self) -> TrainConfig:
        """The training settings: the preset's, with every option given."""
        unknown = sorted(set(self.train) - set(TRAIN_FIELDS))
        if unknown:
            raise ValueError(f"unknown training options {unknown}; choose from {', '.join(TRAIN_FIELDS)}")
        given = {k: v for k, v in self.train.items() if v is not None}
        return TrainConfig(**{**get_preset(self.preset).train, **given})

    def probe_config(self) -> ProbeConfig | None:
        return probe_config(self.probe_every, self.probe_schedule, self.probe_stats)

    def build(self, ctx: DistContext | None = None) -> tuple[ModelConfig, TrainConfig, ProbeConfig | None, Path]:
        """``(model, training, probes or None, run folder)``. Under ``torchrun`` (``ctx`` distributed) every
        rank raises the same error for a bad option, reported by rank 0 alone."""
        try:
            model = self.model_config()
            train, probe = self.train_config(), self.probe_config()
        except (ValueError, FileNotFoundError) as e:
            if ctx is None:
                raise
            raise mark_shared(mark_quiet(e) if not ctx.is_main else e) from None
        out = self.out or Path("runs") / f"{self.preset}-{model.norm.value}{'-gpas' if model.gpas else ''}"
        return model, train, probe, out


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``: distinct non-negative integers, or a one-line error."""
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--seeds must be a comma list of integers such as 0,1,2, got {text!r}") from None
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds must list distinct non-negative integers, got {text!r}")
    return seeds


def seed_runs(options: TrainOptions, seeds: list[int], ctx: DistContext | None = None) -> list[TrainOptions]:
    """One copy of ``options`` per seed, each into ``OUT-seedN`` (``OUT`` the run folder the options name):
    sibling folders whose names group them (:mod:`gpas_probe.analysis.seeds`)."""
    if options.train.get("seed") is not None:
        raise ValueError("--seed and --seeds exclude each other: one seed, or one run per seed")
    out = options.build(ctx)[3]
    return [dataclasses.replace(options, train={**options.train, "seed": seed},
                                out=out.with_name(f"{out.name}-seed{seed}")) for seed in seeds]


def run_label(model: ModelConfig, ctx: DistContext | None = None) -> str:
    """``pre+gpas``, ``mixln``, ... and the data-parallel mode (``pre+gpas (ddp x2)``)."""
    label = f"{model.norm.value}{'+gpas' if model.gpas else ''}"
    if ctx is not None and ctx.distributed:
        label += f" ({ctx.mode} x{ctx.world})"
    return label
