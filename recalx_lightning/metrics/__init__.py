"""Calibration metrics: KL calibration error, top-label ECE, NLL, Brier score, and per-level evaluation.

=================================  ========================================================================
``kl_calibration_error``           CE_KL by leave-one-out kernel regression (Popordanoska et al. 2024):
``KLCalibrationError``             ``variant=`` canonical (Dirichlet), top_label / classwise (Beta); returns
                                   (value, bandwidth); Metric with list states (DDP-exact)
``top_label_calibration_error``    top-label ECE / MCE, equal-width bins, confidence 1.0 in the last bin
``negative_log_likelihood``        mean −log p_y
``brier_score``                    mean Σ_k (p_k − [y = k])²
``PerLevelMetric``                 one metric per perturbation-level bin → (B,) values
``max_over_levels``                CE^max over level bins (NaN bins ignored)
``relative_reduction``             (before − after) / before
=================================  ========================================================================

Accuracy: ``torchmetrics.classification.MulticlassAccuracy(num_classes=K, average="micro")``.
The ``Metric`` classes (torchmetrics) live in :mod:`recalx_lightning.metrics.modular` and load on first use;
the functions import without torchmetrics.
"""

import importlib
from typing import Any

from recalx_lightning.metrics._inputs import PROB_EPS
from recalx_lightning.metrics.classification import (
    ReliabilityBins,
    brier_score,
    confidence_bin,
    negative_log_likelihood,
    reliability_bins,
    top_label_calibration_error,
)
from recalx_lightning.metrics.kl_calibration import (
    BANDWIDTH_RULES,
    DEFAULT_BANDWIDTHS,
    VARIANTS,
    KLCalibrationResult,
    beta_loo_log_likelihood,
    dirichlet_loo_log_likelihood,
    kl_calibration_error,
    select_bandwidth,
)
from recalx_lightning.metrics.per_level import max_over_levels, relative_reduction

_MODULAR = ("BrierScore", "KLCalibrationError", "NegativeLogLikelihood", "PerLevelMetric", "TopLabelCalibrationError")


def __getattr__(name: str) -> Any:
    if name not in _MODULAR:
        raise AttributeError(f"module 'recalx_lightning.metrics' has no attribute {name!r}")
    value = getattr(importlib.import_module("recalx_lightning.metrics.modular"), name)
    globals()[name] = value
    return value

__all__ = [
    "BANDWIDTH_RULES",
    "DEFAULT_BANDWIDTHS",
    "VARIANTS",
    "PROB_EPS",
    "BrierScore",
    "KLCalibrationError",
    "KLCalibrationResult",
    "NegativeLogLikelihood",
    "PerLevelMetric",
    "ReliabilityBins",
    "TopLabelCalibrationError",
    "beta_loo_log_likelihood",
    "brier_score",
    "confidence_bin",
    "dirichlet_loo_log_likelihood",
    "kl_calibration_error",
    "max_over_levels",
    "negative_log_likelihood",
    "relative_reduction",
    "reliability_bins",
    "select_bandwidth",
    "top_label_calibration_error",
]
