"""Which loggers a probe sends its summaries to, and how: :class:`LogConfig`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from gpas_probe.extras import require

#: The loggers known by name, each with (the module it needs, its extra, what it is needed for).
LOGGERS: dict[str, tuple[str, str, str]] = {
    "tensorboard": ("tensorboard", "tensorboard", "to log to TensorBoard (--log-to tensorboard)"),
    "wandb": ("wandb", "wandb", "to log to Weights & Biases (--log-to wandb)"),
    "mlflow": ("mlflow", "mlflow", "to log to MLflow (--log-to mlflow)"),
}


@runtime_checkable
class Sink(Protocol):
    """Anything that takes a recorded step's summary: ``log(step, metrics)`` (metric name -> float, every
    value a plain host number), and ``close()`` once the probe closes."""

    def log(self, step: int, metrics: dict[str, float]) -> None: ...
    def close(self) -> None: ...


@dataclass
class LogConfig:
    """Loggers that receive a compact per-layer summary of every recorded step, beside the parquet table
    (which stays the record).

    ``to`` names loggers (``tensorboard``, ``wandb``, ``mlflow``) or holds :class:`Sink` objects of your
    own. ``dir`` is where TensorBoard's event files (``DIR/tensorboard/``) and W&B's folder
    (``DIR/wandb/``) go; default: the run folder. ``prefix`` starts every metric name
    (``gpas/var/resid_post/layer_07``). ``project`` is the W&B project and the MLflow experiment;
    ``run_name`` the run's name there (default: the run id). ``image_every``: TensorBoard also gets a
    variance-by-layer image every N recorded steps (0: none). ``mlflow_uri``: the MLflow tracking URI
    (None: MLflow's own setting, ``mlflow.set_tracking_uri`` or ``MLFLOW_TRACKING_URI``); ``wandb_init``: more
    keyword arguments of ``wandb.init`` (``entity``, ``tags``, ``mode`` ...). A W&B or MLflow
    run already active in the process is logged to (and left open); otherwise one is started and ended
    with the probe.
    """

    to: tuple[str | Sink, ...] = ()
    dir: Path | None = None
    prefix: str = "gpas"
    project: str = "gpas-probe"
    run_name: str | None = None
    image_every: int = 0
    mlflow_uri: str | None = None
    wandb_init: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        to = tuple(part for part in self.to.split(",") if part.strip()) if isinstance(self.to, str) else tuple(self.to)
        names = [t.strip() for t in to if isinstance(t, str)]
        bad = [n for n in names if n not in LOGGERS]
        if bad:
            raise ValueError(f"unknown logger {', '.join(map(repr, bad))}; choose from {', '.join(LOGGERS)}")
        if len(set(names)) != len(names):
            raise ValueError(f"a logger is named twice: {', '.join(names)}")
        wrong = [t for t in to if not isinstance(t, (str, Sink))]
        if wrong:
            raise ValueError(f"a logger is a name or an object with log(step, metrics) and close(), got {wrong[0]!r}")
        if not self.prefix or self.prefix.strip("/") != self.prefix:
            raise ValueError(f"the metric prefix must be a non-empty name without a leading or trailing '/', "
                             f"got {self.prefix!r}")
        if self.image_every < 0:
            raise ValueError(f"image_every must be 0 (no image) or positive, got {self.image_every}")
        self.to = tuple(t.strip() if isinstance(t, str) else t for t in to)
        self.dir = Path(self.dir) if self.dir is not None else None

    @property
    def names(self) -> tuple[str, ...]:
        """The loggers named (not the sink objects)."""
        return tuple(t for t in self.to if isinstance(t, str))

    def require(self) -> None:
        """Import every named logger's package, or raise one ``ImportError`` line naming its extra."""
        for name in self.names:
            require(*LOGGERS[name])

    @classmethod
    def of(cls, log_to: LogTo) -> LogConfig | None:
        """``log_to`` as given to :func:`gpas_probe.train`, :func:`gpas_probe.attach` or ``--log-to``: a
        comma list (``"tensorboard,wandb"``), a sequence of names and sinks, a LogConfig, or None/empty
        (no logger: None)."""
        if log_to is None or isinstance(log_to, LogConfig):
            return log_to if log_to is None or log_to.to else None
        config = cls(to=log_to if isinstance(log_to, str) else tuple(log_to))
        return config if config.to else None


#: What ``log_to`` takes: a comma list of names, names and sinks, a LogConfig, or None (no logger).
LogTo = str | Sequence[str | Sink] | LogConfig | None
