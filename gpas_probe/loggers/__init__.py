"""Loggers beside the probe table: each recorded step's compact per-layer summary sent to TensorBoard,
Weights & Biases or MLflow (``--log-to``, ``attach(..., log_to=...)``, ``train(..., log_to=...)``).

``config`` (:class:`LogConfig`: which loggers, names, folders), ``summary`` (which rows, under which
names), ``sinks`` (:class:`Loggers`: the rows a recorded step already has on the host, in; summaries
out, on rank 0 only) and one module per logger: ``to_tensorboard``, ``to_wandb``, ``to_mlflow`` (each
imports its package when opened: the ``tensorboard``, ``wandb`` and ``mlflow`` extras).
"""

from gpas_probe.loggers.config import LOGGERS, LogConfig, LogTo, Sink
from gpas_probe.loggers.sinks import Loggers, is_rank_zero, open_loggers
from gpas_probe.loggers.summary import MODEL_STATS, PER_LAYER, Summary, layer_digits, layer_name

__all__ = ["LOGGERS", "MODEL_STATS", "PER_LAYER", "LogConfig", "Loggers", "LogTo", "Sink", "Summary", "is_rank_zero",
           "layer_digits", "layer_name", "open_loggers"]
