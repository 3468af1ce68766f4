"""MLflow: each recorded step's summary as metrics with ``step=`` (names keep their ``/``), through an
``MlflowClient``; the run's configs as params."""

from __future__ import annotations

import importlib
import logging
import time
from typing import Any

from gpas_probe.errors import first_line

log = logging.getLogger(__name__)

BATCH_METRICS, BATCH_PARAMS, MAX_PARAM = 1000, 100, 500  # MLflow's batch limits; longer values are left out


def flat_params(meta: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Scalar values of ``meta`` (nested dicts joined with '.'), as MLflow params."""
    out: dict[str, str] = {}
    for key, value in meta.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_params(value, name + "."))
        elif isinstance(value, (str, int, float, bool)) or value is None:
            if len(text := str(value)) <= MAX_PARAM:
                out[name] = text
    return out


class MlflowSink:
    """Logs to the active MLflow run of this process when there is one on the same tracking server (left
    open at the end), or to a run it creates in experiment ``experiment`` (ended at the end).
    ``tracking_uri`` None: MLflow's own setting (``mlflow.set_tracking_uri``, ``MLFLOW_TRACKING_URI``). A
    tracking store MLflow cannot use is one ``ValueError`` line naming it."""

    def __init__(self, experiment: str, run_name: str, run_id: str, meta: dict[str, Any],
                 tracking_uri: str | None) -> None:
        mlflow = importlib.import_module("mlflow")
        self._entities = importlib.import_module("mlflow.entities")
        try:
            self._start(mlflow, experiment, run_name, run_id, meta, tracking_uri)
        except mlflow.exceptions.MlflowException as e:
            uri = tracking_uri or mlflow.get_tracking_uri()
            raise ValueError(f"MLflow cannot log to {uri!r}: {first_line(e)}") from None

    def _start(self, mlflow: Any, experiment: str, run_name: str, run_id: str, meta: dict[str, Any],
               tracking_uri: str | None) -> None:
        self.client = mlflow.MlflowClient(tracking_uri=tracking_uri)
        active = mlflow.active_run()
        if active is not None and (tracking_uri is None or tracking_uri == mlflow.get_tracking_uri()):
            self.owned, self.run_id = False, active.info.run_id
            log.info("logging the probe summaries to the active MLflow run %s", self.run_id)
            return
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found is not None else self.client.create_experiment(experiment)
        run = self.client.create_run(experiment_id, run_name=run_name, tags={"gpas_probe.run_id": run_id})
        self.owned, self.run_id = True, run.info.run_id
        params = [self._entities.Param(k, v) for k, v in flat_params(meta).items()]
        for i in range(0, len(params), BATCH_PARAMS):
            self.client.log_batch(self.run_id, params=params[i:i + BATCH_PARAMS])

    def log(self, step: int, metrics: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        batch = [self._entities.Metric(k, v, now, step) for k, v in metrics.items()]
        for i in range(0, len(batch), BATCH_METRICS):
            self.client.log_batch(self.run_id, metrics=batch[i:i + BATCH_METRICS])

    def close(self) -> None:
        if self.owned:
            self.client.set_terminated(self.run_id)
