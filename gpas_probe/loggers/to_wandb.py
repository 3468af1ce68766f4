"""Weights & Biases: each recorded step's summary with ``run.log``, plotted against its own step metric
(``PREFIX/step``, declared with ``define_metric``), so that it shares a run with other logging."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class WandbSink:
    """Logs to the W&B run already active in this process (left open at the end), or to one it starts
    (``wandb.init(project=, name=, dir=folder, config=meta, **init)``, finished at the end). The mode
    (online, offline) and the credentials are W&B's own settings (``wandb login``, ``WANDB_MODE``).
    Each summary is one ``log`` call (a row of W&B's own step counter) whose metrics under ``PREFIX/`` are
    plotted against ``PREFIX/step``, the probe's step (W&B's custom x-axis): in a run shared with your own
    logging, log without ``step=`` or against a step metric of your own, as W&B advises for several
    writers."""

    def __init__(self, folder: Path | None, project: str, run_name: str, prefix: str, meta: dict[str, Any],
                 init: dict[str, Any]) -> None:
        wandb = importlib.import_module("wandb")
        self.owned = wandb.run is None
        if self.owned:
            kwargs: dict[str, Any] = {"project": project, "name": run_name, "config": meta}
            if folder is not None:
                folder.mkdir(parents=True, exist_ok=True)
                kwargs["dir"] = str(folder)
            self.run = wandb.init(**{**kwargs, **init})
        else:
            self.run = wandb.run
            log.info("logging the probe summaries to the active W&B run %s", self.run.name)
        self.step_key = f"{prefix}/step"
        self.run.define_metric(self.step_key)
        self.run.define_metric(f"{prefix}/*", step_metric=self.step_key)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log({self.step_key: step, **metrics})

    def close(self) -> None:
        if self.owned:
            self.run.finish()
