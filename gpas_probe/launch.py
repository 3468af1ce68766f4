"""From command-line options to configurations: what ``gpas-probe train`` builds, checked here so that
every bad value is one ``ValueError`` line (and, under ``torchrun``, the same error on every rank)."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpas_probe.config import (
    GateGranularity,
    ModelConfig,
    NormScheme,
    ScalingMode,
    TrainConfig,
    get_preset,
    parse_choice,
)
from gpas_probe.distributed import DistContext, mark_quiet, mark_shared
from gpas_probe.folders import RUN_META, read_run_meta
from gpas_probe.probes import FAMILIES, ProbeConfig

log = logging.getLogger(__name__)

#: TrainConfig fields ``gpas-probe train`` takes as options (None: the preset's value).
TRAIN_FIELDS = ("steps", "lr", "warmup", "batch_size", "seq_len", "seed", "data", "checkpoint_every", "keep_last",
                "autosave", "eval_every", "grad_clip", "gate_clip", "device", "compile", "threads")


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
    gate: str | None = None  # None: one gate per layer
    naive: bool = False
    fixed_gate: float | None = None
    post_layers: int | None = None
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields; a None value means the preset's
    probe_every: int = 10
    probe_schedule: str = "every"
    probe_stats: str = ",".join(FAMILIES)
    out: Path | None = None
    log_to: str | None = None  # loggers of the probes' summaries (a comma list; checked by train())

    def model_config(self) -> ModelConfig:
        """The model: the preset's, with the scheme and GPAS options. An option that would do nothing
        (a GPAS option without GPAS, post layers outside Mix-LN) is refused rather than ignored."""
        norm = parse_choice(self.norm, NormScheme, "scheme")
        gate = parse_choice(self.gate or "layer", GateGranularity, "gate")
        self._check_used(norm)
        kw: dict[str, Any] = {"gpas_granularity": gate}
        if self.post_layers is not None:
            kw["post_layers"] = self.post_layers
        if self.naive:
            kw["gpas_mode"] = ScalingMode.NAIVE
        if self.fixed_gate is not None:
            kw.update(gpas_learnable=False, gpas_init=self.fixed_gate)
        return ModelConfig.from_preset(self.preset, norm=norm, gpas=self.gpas or self.naive, **kw)

    def _check_used(self, norm: NormScheme) -> None:
        if not (self.gpas or self.naive):
            given = [flag for flag, value in (("--gate", self.gate), ("--fixed-gate", self.fixed_gate),
                                              ("--gate-grad-clip", self.train.get("gate_clip"))) if value is not None]
            if given:
                raise ValueError(f"{', '.join(given)}: GPAS gate options do nothing without --gpas (or --naive); "
                                 "add it, or leave them out")
        if self.post_layers is not None and norm is not NormScheme.MIXLN:
            raise ValueError(f"--post-layers is a Mix-LN option: add --norm mixln, or leave it out "
                             f"(the scheme is {norm.value})")

    def train_config(self) -> TrainConfig:
        """The training settings: the preset's, with every option given."""
        unknown = sorted(set(self.train) - set(TRAIN_FIELDS))
        if unknown:
            raise ValueError(f"unknown training options {unknown}; choose from {', '.join(TRAIN_FIELDS)}")
        given = {k: v for k, v in self.train.items() if v is not None}
        config = TrainConfig(**{**get_preset(self.preset).train, **given})
        if config.warmup >= config.steps:
            log.warning("--warmup %d is not shorter than --steps %d: the learning rate only warms up and never "
                        "decays", config.warmup, config.steps)
        return config

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
        out = self.out or Path("runs") / f"{self.preset}-{run_label(model).replace('+', '-')}"
        return model, train, probe, out


    def for_resume(self, given: set[str], ctx: DistContext | None = None
                   ) -> tuple[ModelConfig, TrainConfig, ProbeConfig | None, Path]:
        """What ``--resume`` continues: the run's own model, training settings and probes (its ``run.json``),
        with the options in ``given`` (those typed on the command line) applied. A model option given
        that differs from the run's is refused here, an arithmetic setting by :func:`gpas_probe.runs.
        check_resumable`; the others (steps, evaluation, checkpoints, device, probes) take effect."""
        try:
            return self._for_resume(given)
        except (ValueError, FileNotFoundError) as e:
            if ctx is None or not ctx.distributed:
                raise
            raise mark_shared(mark_quiet(e) if not ctx.is_main else e) from None

    def _for_resume(self, given: set[str]) -> tuple[ModelConfig, TrainConfig, ProbeConfig | None, Path]:
        out = self.out or self.build()[3]
        if not (out / RUN_META).is_file():
            raise FileNotFoundError(f"{out}: no run to resume (no {RUN_META}); leave out --resume to start one")
        meta = read_run_meta(out / RUN_META)
        model = ModelConfig.from_dict(meta["model_config"])
        chosen = given & set(MODEL_FIELDS)
        if chosen:
            mine = dataclasses.replace(self, **{k: v for k, v in _options_of(model, meta).items() if k not in given})
            if parse_choice(mine.norm, NormScheme, "scheme") is not NormScheme.MIXLN and "post_layers" not in given:
                mine.post_layers = None  # the run's, from a scheme the options now leave
            if not (mine.gpas or mine.naive):
                mine.gate = mine.gate if "gate" in given else None
                mine.fixed_gate = mine.fixed_gate if "fixed_gate" in given else None
            mine_model = mine.model_config().to_dict()
            fields = sorted({f for option in chosen for f in MODEL_FIELDS[option] or mine_model})
            ran = model.to_dict()
            diff = [f"{f} (run: {ran[f]!r}, now: {mine_model[f]!r})" for f in fields if ran[f] != mine_model[f]]
            if diff:
                raise ValueError(f"{out}: --resume with a model that differs from the run's: {', '.join(diff)}")
        overrides = {k: v for k, v in self.train.items() if k in given and v is not None}
        train = TrainConfig.from_dict({**meta["train_config"], **overrides})
        probe = self.probe_config()
        if not given & set(PROBE_OPTIONS) and "probe_config" in meta:  # the run's probes (None: off)
            probe = ProbeConfig.from_dict(meta["probe_config"]) if meta["probe_config"] else None
        return model, train, probe, out


#: Options that choose the model, and the ModelConfig fields each decides (empty: every field, the preset's).
MODEL_FIELDS: dict[str, tuple[str, ...]] = {
    "preset": (), "norm": ("norm",), "gpas": ("gpas",), "gate": ("gpas_granularity",), "naive": ("gpas", "gpas_mode"),
    "fixed_gate": ("gpas_learnable", "gpas_init"), "post_layers": ("post_layers",)}
PROBE_OPTIONS = ("probe_every", "probe_schedule", "probe_stats")


def _options_of(model: ModelConfig, meta: dict[str, Any]) -> dict[str, Any]:
    """The model options that build ``model`` (a run's), for filling the ones not given on resume."""
    naive = model.gpas and model.gpas_mode is ScalingMode.NAIVE
    return {"preset": meta.get("preset", "small"), "norm": model.norm.value, "gpas": model.gpas and not naive,
            "naive": naive, "gate": model.gpas_granularity.value if model.gpas else None,
            "fixed_gate": None if model.gpas_learnable or not model.gpas else model.gpas_init,
            "post_layers": model.post_layers if model.norm is NormScheme.MIXLN else None}


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
    """``pre+gpas``, ``mixln``, ``pre+naive`` (the no-stop-gradient ablation), ... and the data-parallel mode
    (``pre+gpas (ddp x2)``)."""
    label = model.label()
    if ctx is not None and ctx.distributed:
        label += f" ({ctx.mode} x{ctx.world})"
    return label
