"""recalx_lightning: recalibrate classifiers per perturbation level (ReCalX) for trustworthy explanations.

Core API (see each object's docstring for shapes)::

    Perturbation            feature mask + baseline; apply(x, keep), level(keep[, informative]),
                            informative(x) (effective level), sample_keep(...)
    BinnedTemperature       ReCalX_TS: one temperature per level bin
    SmoothTemperature       log T piecewise linear in the level
    GlobalTemperature       classic temperature scaling
    fit_temperatures        fit any calibrator on cached logits (exact Newton or the paper's L-BFGS)
    RecalibratedClassifier  model + calibrator + perturbation; keep_forward for Captum at exact levels
"""

from recalx_lightning.calibrators import (
    BinnedTemperature,
    GlobalTemperature,
    SmoothTemperature,
    TemperatureCalibrator,
    load_calibrator,
    make_calibrator,
)
from recalx_lightning.callbacks import ExplanationQualityCallback
from recalx_lightning.classifier import RecalibratedClassifier
from recalx_lightning.data import make_dataset
from recalx_lightning.datamodule import PerturbationDataModule
from recalx_lightning.explain import (
    Explanation,
    alignment,
    deletion_curve,
    explain,
    explain_variants,
    global_importance,
    insertion_curve,
    localization,
    paired_bootstrap_ci,
    pointing_game,
)
from recalx_lightning.fitting import CachedObjective, FitDiagnostics, FitResult, fit_temperatures
from recalx_lightning.models import ModelInfo, create_model, load_reference_model, model_info
from recalx_lightning.module import ReCalXModule
from recalx_lightning.perturbation import (
    Baseline,
    BlurBaseline,
    ChannelMeanBaseline,
    ConstantBaseline,
    NoiseBaseline,
    Perturbation,
    level_to_bin,
    make_baseline,
    patch_mask,
    subset_generator,
)

__version__ = "0.1.0"

__all__ = [
    "CachedObjective",
    "ExplanationQualityCallback",
    "Explanation",
    "ModelInfo",
    "alignment",
    "create_model",
    "deletion_curve",
    "explain",
    "explain_variants",
    "global_importance",
    "insertion_curve",
    "load_reference_model",
    "localization",
    "make_dataset",
    "model_info",
    "paired_bootstrap_ci",
    "pointing_game",
    "Baseline",
    "BinnedTemperature",
    "BlurBaseline",
    "ChannelMeanBaseline",
    "ConstantBaseline",
    "FitDiagnostics",
    "FitResult",
    "GlobalTemperature",
    "NoiseBaseline",
    "Perturbation",
    "PerturbationDataModule",
    "ReCalXModule",
    "RecalibratedClassifier",
    "SmoothTemperature",
    "TemperatureCalibrator",
    "fit_temperatures",
    "level_to_bin",
    "load_calibrator",
    "make_baseline",
    "make_calibrator",
    "patch_mask",
    "subset_generator",
]
