"""What a profile does, declared: which evaluation batches, how checkpoints load, what is measured."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpas_probe.config import BACKENDS, check_threads

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

#: Evaluation window length when neither the run's training length nor a shorter model maximum is known
#: (a long-context model is profiled on windows of this length, not its maximum: that would cost more
#: than the profile's other settings suggest).
DEFAULT_SEQ_LEN = 256


@dataclass(frozen=True)
class EvalSpec:
    """The evaluation batches (:mod:`gpas_probe.evaldata`): ``data`` (``"builtin"``, a text file, or
    ``.npy``/``.bin`` tokens), ``tokenizer`` (a ``tokenizer.json`` for text; default: a checkpoint's own
    when it has one, else bytes), and ``batches`` batches of ``batch_size`` windows of ``seq_len`` tokens.
    ``seq_len=None`` (the default) is chosen per profile by :meth:`with_seq_len`: the length the run was
    trained on when its ``run.json`` says, else the model's maximum up to :data:`DEFAULT_SEQ_LEN`."""

    data: str | Path = "builtin"
    tokenizer: Any = None
    batches: int = 8
    batch_size: int = 8
    seq_len: int | None = None

    def __post_init__(self) -> None:
        for name in ("batches", "batch_size", "seq_len"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    def with_seq_len(self, trained: int | None, max_len: int | None) -> tuple[EvalSpec, str]:
        """This spec with its ``seq_len`` chosen when it was None (class doc), and why, in words."""
        if self.seq_len is not None:
            return self, "as given"
        if trained:
            return replace(self, seq_len=trained), "the run's training length"
        if max_len and max_len <= DEFAULT_SEQ_LEN:
            return replace(self, seq_len=max_len), "the model's maximum"
        why = f"the default; the model's maximum is {max_len}" if max_len else "the default"
        return replace(self, seq_len=DEFAULT_SEQ_LEN), why

    @property
    def sizes(self) -> tuple[int, int, int]:
        """``(batch_size, seq_len, batches)``, the arguments of :meth:`gpas_probe.evaldata.EvalData.batches`
        (``seq_len`` must have been chosen: :meth:`with_seq_len`)."""
        if self.seq_len is None:
            raise ValueError("seq_len not chosen yet: call with_seq_len first")
        return self.batch_size, self.seq_len, self.batches


@dataclass(frozen=True)
class LoadSpec:
    """How checkpoints load (:func:`gpas_probe.checkpoints.load`): ``backend`` (``auto``, ``native``,
    ``hf``), ``norm``/``post_layers`` where the weights cannot tell the scheme, ``dtype`` (default: as
    stored) and ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``). ``stream``: one decoder layer's
    weights in memory at a time (:mod:`gpas_probe.profile.streamed`), for models larger than memory;
    ``threads``: CPU intra-op threads, 0 = as many as cores are free, re-checked during the run
    (:mod:`gpas_probe.threads`)."""

    backend: str = "auto"
    norm: str | None = None
    post_layers: int | None = None
    dtype: torch.dtype | str | None = None
    device: str | torch.device = "auto"
    stream: bool = False
    threads: int = 0

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        check_threads(self.threads)
        if self.stream and self.backend == "hf":
            raise ValueError("streaming profiles natively loaded checkpoints only, not with the hf backend")


#: How deletion importance is measured: replaying the later layers for each deleted one, the first-order
#: estimate from the backward pass (free), or both.
DELETION_MODES = ("exact", "estimate", "both")


@dataclass(frozen=True)
class Measurements:
    """What is measured: ``activations`` (forward/backward statistics of every probe family, with 95%
    intervals) and ``importance`` (deletion, angular distance, block influence, with theirs);
    ``deletion`` (:data:`DELETION_MODES`) says how deletion is measured.
    ``skip_first_position`` leaves position 0 of every window out of the statistics (and of block
    influence): the attention sink of trained LLMs; ``outlier_factor`` says which tokens count as
    outliers (a token RMS above that multiple of the median token's)."""

    activations: bool = True
    importance: bool = True
    deletion: str = "exact"
    skip_first_position: bool = False
    outlier_factor: float = 10.0

    @property
    def exact(self) -> bool:
        return self.importance and self.deletion in ("exact", "both")

    @property
    def estimate(self) -> bool:
        return self.importance and self.deletion in ("estimate", "both")

    def __post_init__(self) -> None:
        if self.deletion not in DELETION_MODES:
            raise ValueError(f"unknown importance {self.deletion!r}; choose one of {', '.join(DELETION_MODES)}")
        if not (self.activations or self.importance):
            raise ValueError("nothing to profile: both activations and importance are off")
        if not self.outlier_factor > 1:
            raise ValueError(f"outlier_factor must be above 1, got {self.outlier_factor}")


@dataclass(frozen=True)
class ProfileConfig:
    """A profile's settings in three groups; :meth:`of` builds one from flat options."""

    evaluation: EvalSpec = field(default_factory=EvalSpec)
    loading: LoadSpec = field(default_factory=LoadSpec)
    measure: Measurements = field(default_factory=Measurements)

    def with_seq_len(self, trained: int | None, max_len: int | None) -> tuple[ProfileConfig, str]:
        """This config with its evaluation's ``seq_len`` chosen (:meth:`EvalSpec.with_seq_len`), logged
        when it was chosen here, and why, in words."""
        evaluation, why = self.evaluation.with_seq_len(trained, max_len)
        if why != "as given":
            log.info("evaluation windows of %d tokens (%s)", evaluation.seq_len, why)
        return replace(self, evaluation=evaluation), why

    @classmethod
    def of(cls, **options: Any) -> ProfileConfig:
        """From flat options, each a field of one group: ``ProfileConfig.of(data="notes.txt", seq_len=128,
        dtype="bf16", importance=False)``."""
        groups = {"evaluation": EvalSpec, "loading": LoadSpec, "measure": Measurements}
        owner = {f.name: group for group, spec in groups.items() for f in fields(spec)}
        unknown = sorted(set(options) - set(owner))
        if unknown:
            raise TypeError(f"unknown profile options {unknown}; choose from {sorted(owner)}")
        parts: dict[str, dict[str, Any]] = {group: {} for group in groups}
        for name, value in options.items():
            parts[owner[name]][name] = value
        return cls(**{group: spec(**parts[group]) for group, spec in groups.items()})
