"""Configuration dataclasses, the normalization-scheme enum and the model presets.

Everything that selects an architecture or a training behaviour lives here as data: no environment
variables, no flags read inside ``forward``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, TypeVar

T = TypeVar("T")
E = TypeVar("E", bound=Enum)


def from_fields(cls: type[T], d: Mapping[str, Any]) -> T:
    """``cls(**d)`` for a config dataclass, refusing keys that are none of its fields."""
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
    return cls(**d)


class NormScheme(str, Enum):
    """Where the normalization layers sit in a decoder layer (DESIGN §4)."""

    PRE = "pre"
    POST = "post"
    SANDWICH = "sandwich"
    DEEPNORM = "deepnorm"
    MIXLN = "mixln"
    LNS = "lns"  # LayerNorm Scaling with the fixed factor 1/sqrt(l+1)
    LNS_GAIN = "lns-gain"  # the paper code's variant: a learnable RMSNorm gain initialised to 1/sqrt(l+1)

    def __str__(self) -> str:
        return self.value


class Family(str, Enum):
    """The per-layer wiring a scheme resolves to; Mix-LN mixes two families across depth."""

    PRE = "pre"
    POST = "post"
    SANDWICH = "sandwich"


class GateGranularity(str, Enum):
    """One GPAS gate per decoder layer (the paper's) or one per sub-layer."""

    LAYER = "layer"
    SUBLAYER = "sublayer"

    def __str__(self) -> str:
        return self.value


class ScalingMode(str, Enum):
    """GPAS proper (stop-gradient) or the paper's naive-scaling ablation (no stop-gradient)."""

    GPAS = "gpas"
    NAIVE = "naive"

    def __str__(self) -> str:
        return self.value


@dataclass
class ModelConfig:
    """A LLaMA-style decoder; field names follow nanoGPT/HF where they exist."""

    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 172
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int | None = None  # None = num_heads (no grouped-query attention)
    head_dim: int | None = None  # None = hidden_size // num_heads
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # HF's Llama-3 "llama3" scaling block
    rms_eps: float = 1e-6
    qkv_bias: bool = False
    tie_embeddings: bool = False
    norm: NormScheme = NormScheme.PRE
    post_layers: int | None = None  # Mix-LN: layers l < post_layers are post-norm; None = L // 4
    gpas: bool = False
    gpas_granularity: GateGranularity = GateGranularity.LAYER
    gpas_mode: ScalingMode = ScalingMode.GPAS
    gpas_learnable: bool = True
    gpas_init: float = 0.0
    init_std: float = 0.02
    embed_init_std: float = math.sqrt(2 / 5)  # "Spike No More"; 0.02 is the plain alternative

    def __post_init__(self) -> None:
        self.norm = NormScheme(self.norm)
        self.gpas_granularity = GateGranularity(self.gpas_granularity)
        self.gpas_mode = ScalingMode(self.gpas_mode)
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
                )
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.norm is NormScheme.MIXLN:
            if self.post_layers is None:
                self.post_layers = self.num_layers // 4
            if not 0 <= self.post_layers <= self.num_layers:
                raise ValueError(f"post_layers must be in [0, {self.num_layers}], got {self.post_layers}")

    def family(self, layer: int) -> Family:
        """The wiring of decoder layer ``layer`` (0-based)."""
        if self.norm is NormScheme.MIXLN:
            return Family.POST if layer < (self.post_layers or 0) else Family.PRE
        if self.norm in (NormScheme.POST, NormScheme.DEEPNORM):
            return Family.POST
        if self.norm is NormScheme.SANDWICH:
            return Family.SANDWICH
        return Family.PRE

    @property
    def deepnorm_alpha(self) -> float:
        """DeepNorm's shortcut multiplier ``a = (2L)^(1/4)``; 1 for every other scheme."""
        return (2 * self.num_layers) ** 0.25 if self.norm is NormScheme.DEEPNORM else 1.0

    def label(self) -> str:
        """The scheme in a word: ``pre``, ``pre+gpas``, ``pre+naive`` (the no-stop-gradient ablation)."""
        if not self.gpas:
            return self.norm.value
        return f"{self.norm.value}+{'naive' if self.gpas_mode is ScalingMode.NAIVE else 'gpas'}"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, Enum):
                d[k] = v.value
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        return from_fields(cls, d)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """The model of preset ``name`` (see :data:`PRESETS`), with fields overridden."""
        preset = get_preset(name)
        return cls(**{**preset.model, **overrides})

    def num_parameters(self) -> int:
        """Parameter count computed from the shapes alone (no model is built)."""
        h, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        assert hd is not None and self.num_kv_heads is not None
        attn = h * self.num_heads * hd * 2 + h * self.num_kv_heads * hd * 2
        if self.qkv_bias:
            attn += self.num_heads * hd + 2 * self.num_kv_heads * hd
        norms = sum(_norms_per_family(self.family(layer)) for layer in range(self.num_layers)) * h
        gates = 0
        if self.gpas:
            gates = self.num_layers * (2 if self.gpas_granularity is GateGranularity.SUBLAYER else 1)
        emb = self.vocab_size * h * (1 if self.tie_embeddings else 2)
        return emb + self.num_layers * (attn + 3 * h * f) + norms + h + gates


def _norms_per_family(family: Family) -> int:
    return 4 if family is Family.SANDWICH else 2


def check_threads(threads: int) -> int:
    """``threads`` if it is a valid CPU thread count (0: chosen from the free cores), else a ValueError."""
    if threads < 0:
        raise ValueError(f"threads must be 0 (choose) or positive, got {threads}")
    return threads


@dataclass
class TrainConfig:
    """How to train: optimizer, schedule, data, checkpoints. Defaults suit a CPU run."""

    steps: int = 200
    lr: float = 1e-3
    warmup: int = 20
    min_lr_ratio: float = 0.1  # cosine decays to this fraction of the peak
    batch_size: int = 16
    seq_len: int = 128
    seed: int = 0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0  # global gradient-norm clip; 0 = off
    gate_clip: float = 0.0  # joint GPAS gate-gradient clip, after the global clip; 0 = off
    eval_every: int = 50  # 0 = only at the end
    eval_batches: int = 4
    checkpoint_every: int = 0  # 0 = only at the end (and autosaves)
    keep_last: int = 0  # keep only the latest N checkpoints (the final one counts); 0 = keep them all
    autosave: float = 60.0  # seconds at least between automatic resume checkpoints; 0 = off
    schedule_steps: int | None = None  # the cosine's length; None = steps (a resumed, extended run keeps its own)
    data: str = "builtin"  # "builtin", a text file, a .npy/.bin token file
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    compile: bool = False
    threads: int = 0  # CPU intra-op threads; 0 = as many as cores are free, re-checked (gpas_probe.threads)

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        check_threads(self.threads)
        for name in ("steps", "batch_size", "seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.autosave < 0:
            raise ValueError(f"autosave must be >= 0 seconds, got {self.autosave}")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint every must be >= 0, got {self.checkpoint_every}")
        if self.keep_last < 0:
            raise ValueError(f"keep last must be >= 0 (0 = keep every checkpoint), got {self.keep_last}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        return from_fields(cls, d)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> TrainConfig:
        """The training settings of preset ``name`` (see :data:`PRESETS`), with fields overridden."""
        return cls(**{**get_preset(name).train, **overrides})


@dataclass(frozen=True)
class Preset:
    model: dict[str, Any]
    train: dict[str, Any] = field(default_factory=dict)
    description: str = ""


def _paper(hidden: int, ffn: int, heads: int, layers: int, steps: int, warmup: int, lr: float) -> Preset:
    return Preset(
        model=dict(vocab_size=32000, hidden_size=hidden, intermediate_size=ffn, num_heads=heads,
                   num_layers=layers, max_seq_len=256),
        train=dict(steps=steps, warmup=warmup, lr=lr, seq_len=256, batch_size=512),
        description=f"paper: {layers} layers x {hidden} wide",
    )


#: Model and training presets. The paper's (vocab 32000, seq 256) and small byte-level CPU ones.
PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        model=dict(vocab_size=256, hidden_size=32, intermediate_size=88, num_heads=2, num_layers=4,
                   max_seq_len=128),
        train=dict(steps=20, warmup=2, lr=3e-3, seq_len=32, batch_size=4, eval_every=0, eval_batches=1),
        description="4 layers x 32 wide, for tests",
    ),
    "small": Preset(
        model=dict(vocab_size=256, hidden_size=64, intermediate_size=172, num_heads=4, num_layers=24,
                   max_seq_len=256),
        train=dict(steps=300, warmup=30, lr=3e-3, seq_len=128, batch_size=16, eval_every=50),
        description="24 layers x 64 wide: deep and narrow, shows depth effects on a laptop CPU",
    ),
    "medium": Preset(
        model=dict(vocab_size=256, hidden_size=128, intermediate_size=344, num_heads=4, num_layers=24,
                   max_seq_len=256),
        train=dict(steps=1000, warmup=100, lr=2e-3, seq_len=256, batch_size=16, eval_every=100),
        description="24 layers x 128 wide, a longer CPU run",
    ),
    "71m": _paper(512, 1368, 8, 12, 10_000, 1_000, 1e-3),
    "130m": _paper(768, 2048, 12, 12, 20_000, 2_000, 1e-3),
    "250m": _paper(768, 2560, 16, 24, 40_000, 4_000, 1e-3),
    "350m": _paper(1024, 2736, 16, 24, 60_000, 6_000, 5e-4),
    "1b": _paper(2048, 5461, 32, 24, 100_000, 10_000, 5e-4),
    "7b": _paper(4096, 11008, 32, 32, 150_000, 10_000, 3e-4),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


#: How a checkpoint loads (:mod:`gpas_probe.checkpoints.loader`): ``native`` into our model (ours, the GPAS
#: code's, LLaMA, Mistral, Qwen2), ``hf`` with transformers, ``auto`` natively when the native loader reads
#: it, else with transformers.
BACKENDS = ("auto", "native", "hf")


def parse_choice(value: str | E, enum: type[E], what: str) -> E:
    """``value`` as a member of ``enum``, or a one-line error listing the choices."""
    if isinstance(value, enum):
        return value
    try:
        return enum(value)
    except ValueError:
        raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(m.value for m in enum)}") from None
