"""The loggers of one probe (:class:`Loggers`): a recorded step's rows in, beside the parquet writer, and
its summary out to every sink; opened from a :class:`~gpas_probe.loggers.config.LogConfig`."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gpas_probe.errors import first_line
from gpas_probe.loggers.config import LogConfig, Sink
from gpas_probe.loggers.summary import Summary

log = logging.getLogger(__name__)

Emit = Callable[[int, str, str, str, float], None]  # (layer, site, direction, stat, value), as the families emit


class Loggers:
    """Sends each recorded step's summary to its sinks. :meth:`tee` wraps the step's row writer so that
    the rows the summary names are kept (host numbers, as the writer gets them: nothing is read from a
    device); :meth:`end_step` hands them to every sink. A sink that raises is reported once and gets
    nothing more: the probe table, the record, goes on."""

    def __init__(self, sinks: list[tuple[str, Sink]], summary: Summary) -> None:
        self.sinks = list(sinks)
        self.summary = summary
        self._metrics: dict[str, float] = {}

    def tee(self, emit: Emit) -> Emit:
        """``emit`` that also keeps the rows the summary names, for :meth:`end_step`."""
        metrics: dict[str, float] = {}
        self._metrics = metrics
        name_of = self.summary.name

        def both(layer: int, site: str, direction: str, stat: str, value: float) -> None:
            emit(layer, site, direction, stat, value)
            name = name_of(layer, site, direction, stat)
            if name is not None:
                metrics[name] = value

        return both

    def end_step(self, step: int) -> None:
        """Hand the summary of recorded step ``step`` to every sink."""
        metrics, self._metrics = self._metrics, {}
        if not metrics:
            return
        for label, sink in list(self.sinks):
            try:
                sink.log(step, dict(metrics))
            except Exception as e:  # a logger must not stop the run that the probe table records
                log.warning("%s: logging step %d failed (%s); it gets nothing more from this run (the probe "
                            "table is not affected)", label, step, first_line(e))
                self.sinks.remove((label, sink))

    def close(self) -> None:
        for label, sink in self.sinks:
            try:
                sink.close()
            except Exception as e:
                log.warning("%s: closing failed (%s)", label, first_line(e))
        self.sinks = []


def is_rank_zero() -> bool:
    """Whether this process logs: not one of the later ranks of a ``torch.distributed`` process group."""
    import torch.distributed as dist  # here: the loggers' names and configs do not import torch

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _open(name: str, config: LogConfig, folder: Path | None, run_id: str, meta: dict[str, Any],
          summary: Summary) -> Sink:
    run_name = config.run_name or run_id
    if name == "tensorboard":
        from gpas_probe.loggers.to_tensorboard import TensorBoardSink

        if folder is None:
            raise ValueError("a TensorBoard logger needs a folder: give the probe an output folder or "
                             "LogConfig(dir=...)")
        return TensorBoardSink(folder / "tensorboard", summary, config.image_every)
    if name == "wandb":
        from gpas_probe.loggers.to_wandb import WandbSink

        return WandbSink(folder, config.project, run_name, config.prefix, meta, config.wandb_init)
    from gpas_probe.loggers.to_mlflow import MlflowSink

    return MlflowSink(config.project, run_name, run_id, meta, config.mlflow_uri)


def open_loggers(config: LogConfig, *, depth: int, out: Path | None, run_id: str,
                 meta: dict[str, Any] | None = None) -> Loggers:
    """The sinks of ``config`` for a model of ``depth`` layers, opened: event files and W&B's folder under
    ``config.dir`` or ``out``; ``meta`` (the run's configs) becomes the W&B config and the MLflow params.
    A missing package is one ``ImportError`` line naming its extra, raised before any sink opens."""
    config.require()
    folder = config.dir if config.dir is not None else out
    summary = Summary(depth, config.prefix)
    opened: list[tuple[str, Sink]] = []
    try:
        for target in config.to:
            if isinstance(target, str):
                opened.append((target, _open(target, config, folder, run_id, meta or {}, summary)))
            else:
                opened.append((type(target).__name__, target))
    except BaseException:
        Loggers(opened, summary).close()
        raise
    log.info("logging each recorded step's summary to %s", ", ".join(label for label, _ in opened))
    return Loggers(opened, summary)
