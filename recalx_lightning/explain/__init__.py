"""Explanations at exact perturbation levels and their quality.

``explain`` (Shapley sampling/exact, LIME, KernelSHAP, feature ablation/occlusion; plain or
temperature-consistent, for every method), quality metrics (localization, pointing game, alignment, deletion/insertion,
max-sensitivity, paired bootstrap) and global importance (SAGE values, predictive-power decomposition).
"""

from recalx_lightning.explain.attribution import METHODS, Explanation, draw_permutations, explain, explain_variants
from recalx_lightning.explain.consistent import (
    pair_temperatures,
    role_temperatures,
    size_temperatures,
    surrogate_size_weights,
    surrogate_temperature,
)
from recalx_lightning.explain.importance import (
    GlobalImportance,
    PredictivePower,
    decompose_predictive_power,
    global_importance,
    recovery_auroc,
)
from recalx_lightning.explain.quality import (
    BootstrapResult,
    Curve,
    alignment,
    average_ranks,
    boxes_to_masks,
    deletion_curve,
    insertion_curve,
    localization,
    max_sensitivity,
    paired_bootstrap_ci,
    pointing_game,
    spearman,
)
from recalx_lightning.explain.study import ExplainSettings, explain_dataset

__all__ = [
    "explain_dataset",
    "ExplainSettings",
    "METHODS",
    "BootstrapResult",
    "Curve",
    "Explanation",
    "GlobalImportance",
    "PredictivePower",
    "alignment",
    "average_ranks",
    "boxes_to_masks",
    "decompose_predictive_power",
    "deletion_curve",
    "draw_permutations",
    "explain",
    "explain_variants",
    "global_importance",
    "insertion_curve",
    "localization",
    "max_sensitivity",
    "pair_temperatures",
    "paired_bootstrap_ci",
    "pointing_game",
    "recovery_auroc",
    "role_temperatures",
    "size_temperatures",
    "spearman",
    "surrogate_size_weights",
    "surrogate_temperature",
]
