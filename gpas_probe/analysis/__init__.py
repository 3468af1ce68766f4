"""Analyses over recorded runs and models: run comparison (``summary``), layer importance (``streaming``,
``importance``, ``long``), the underuse diagnosis (``diagnosis``)."""

from typing import TYPE_CHECKING

from gpas_probe.lazy import lazy_exports

# each name imports its module on first use (gpas_probe.lazy): importing the package costs nothing
__getattr__, __dir__ = lazy_exports(__name__, {
    "gpas_probe.analysis.diagnosis": ("Diagnosis", "Thresholds", "diagnose", "diagnose_runs"),
    "gpas_probe.analysis.importance": ("angular_distances", "block_influence", "deletion_importance",
                                       "layer_importance", "naive_deletion_importance"),
    "gpas_probe.analysis.long": ("importance_over_training", "to_long"),
    "gpas_probe.analysis.streaming": ("ImportanceSums", "stream"),
    "gpas_probe.analysis.summary": ("compare_runs",),
})

if TYPE_CHECKING:
    from gpas_probe.analysis.diagnosis import Diagnosis, Thresholds, diagnose, diagnose_runs
    from gpas_probe.analysis.importance import (
        angular_distances,
        block_influence,
        deletion_importance,
        layer_importance,
        naive_deletion_importance,
    )
    from gpas_probe.analysis.long import importance_over_training, to_long
    from gpas_probe.analysis.streaming import ImportanceSums, stream
    from gpas_probe.analysis.summary import compare_runs

__all__ = ["Diagnosis", "ImportanceSums", "Thresholds", "angular_distances", "block_influence", "compare_runs",
           "deletion_importance", "diagnose", "diagnose_runs", "importance_over_training", "layer_importance",
           "naive_deletion_importance", "stream", "to_long"]
