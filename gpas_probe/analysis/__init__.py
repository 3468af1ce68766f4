"""Analyses over recorded runs and models: run comparison, layer importance, the underuse diagnosis."""

from gpas_probe.analysis.diagnose import Diagnosis, Thresholds, diagnose, diagnose_runs
from gpas_probe.analysis.importance import (
    angular_distances,
    block_influence,
    deletion_importance,
    importance_over_training,
    layer_importance,
)
from gpas_probe.analysis.summary import compare_runs

__all__ = ["Diagnosis", "Thresholds", "angular_distances", "block_influence", "compare_runs", "deletion_importance",
           "diagnose", "diagnose_runs", "importance_over_training", "layer_importance"]
