"""recalx_lightning: recalibrate classifiers per perturbation level (ReCalX) for trustworthy explanations.

Core API (see each object's docstring for shapes); nothing here imports Lightning or torchmetrics::

    Perturbation            feature mask + baseline; apply(x, keep), level(keep[, informative]),
                            informative(x) (effective level), sample_keep(...)
    BinnedTemperature       ReCalX_TS: one temperature per level bin
    SmoothTemperature       log T piecewise linear in the level
    GlobalTemperature       classic temperature scaling
    fit_temperatures        fit any calibrator on cached logits (exact Newton or the paper's L-BFGS)
    calibrate               the whole pipeline without Lightning: perturbed samples → cached logits → fitted
                            calibrators (what ``python -m recalx_lightning fit`` runs)
    RecalibratedClassifier  model + calibrator + perturbation; keep_forward for Captum at exact levels
    explain                 attributions (Shapley, LIME, KernelSHAP, occlusion), plain or temperature-consistent
    explain_dataset         the explanation study over a dataset: every variant, per-image scores, summary
    kl_calibration_error    the KL calibration error; evaluate_calibrators: the per-level report

Lightning (``recalx_lightning.lightning``): ReCalXModule, PerturbationDataModule, ExplanationQualityCallback,
ReCalXTrainer. They resolve from the top level too (the ``class_path`` of every config), imported on first access.
"""

from __future__ import annotations

import importlib
import warnings
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it (imported on first attribute access)
_PUBLIC = {
    "Perturbation": "recalx_lightning.perturbation",
    "make_baseline": "recalx_lightning.perturbation",
    "TemperatureCalibrator": "recalx_lightning.calibrators",
    "GlobalTemperature": "recalx_lightning.calibrators",
    "BinnedTemperature": "recalx_lightning.calibrators",
    "SmoothTemperature": "recalx_lightning.calibrators",
    "load_calibrator": "recalx_lightning.calibrators",
    "fit_temperatures": "recalx_lightning.fitting",
    "calibrate": "recalx_lightning.calibration",
    "Calibration": "recalx_lightning.calibration",
    "RecalibratedClassifier": "recalx_lightning.classifier",
    "explain": "recalx_lightning.explain",
    "explain_dataset": "recalx_lightning.explain",
    "Explanation": "recalx_lightning.explain",
    "kl_calibration_error": "recalx_lightning.metrics",
    "KLCalibrationError": "recalx_lightning.metrics",
    "evaluate_calibrators": "recalx_lightning.report",
    "CalibrationReport": "recalx_lightning.report",
    "create_model": "recalx_lightning.models",
    "load_reference_model": "recalx_lightning.models",
    "make_dataset": "recalx_lightning.data",
}
# the Lightning classes: `class_path: recalx_lightning.ReCalXModule` (every shipped config) resolves through here
_LIGHTNING = {
    name: "recalx_lightning.lightning"
    for name in ("ExplanationQualityCallback", "PerturbationDataModule", "ReCalXModule", "ReCalXTrainer")
}
# former top-level names that are internal now: still resolvable, with a DeprecationWarning naming the new import
_MOVED = {
    **{
        name: "recalx_lightning.perturbation"
        for name in (
            "Baseline",
            "BlurBaseline",
            "ChannelMeanBaseline",
            "ConstantBaseline",
            "NoiseBaseline",
            "level_to_bin",
            "patch_mask",
            "subset_generator",
        )
    },
    "make_calibrator": "recalx_lightning.calibrators",
    "CachedObjective": "recalx_lightning.fitting",
    "FitDiagnostics": "recalx_lightning.fitting",
    "FitResult": "recalx_lightning.fitting",
    "ModelInfo": "recalx_lightning.models",
    "model_info": "recalx_lightning.models",
    **{
        name: "recalx_lightning.explain"
        for name in (
            "alignment",
            "deletion_curve",
            "explain_variants",
            "global_importance",
            "insertion_curve",
            "localization",
            "paired_bootstrap_ci",
            "pointing_game",
        )
    },
}

__all__ = [
    "BinnedTemperature",
    "Calibration",
    "CalibrationReport",
    "Explanation",
    "ExplanationQualityCallback",
    "GlobalTemperature",
    "KLCalibrationError",
    "Perturbation",
    "PerturbationDataModule",
    "ReCalXModule",
    "ReCalXTrainer",
    "RecalibratedClassifier",
    "SmoothTemperature",
    "TemperatureCalibrator",
    "calibrate",
    "create_model",
    "evaluate_calibrators",
    "explain",
    "explain_dataset",
    "fit_temperatures",
    "kl_calibration_error",
    "load_calibrator",
    "load_reference_model",
    "make_baseline",
    "make_dataset",
]


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name) or _LIGHTNING.get(name)
    if module is None and name in _MOVED:
        module = _MOVED[name]
        warnings.warn(
            f"`recalx_lightning.{name}` is internal now; import it from `{module}`.", DeprecationWarning, stacklevel=2
        )
    if module is None:
        raise AttributeError(f"module 'recalx_lightning' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    if name not in _MOVED:
        globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:  # static tools and IDEs see the real objects
    from recalx_lightning.calibration import Calibration, calibrate
    from recalx_lightning.calibrators import (
        BinnedTemperature,
        GlobalTemperature,
        SmoothTemperature,
        TemperatureCalibrator,
        load_calibrator,
    )
    from recalx_lightning.classifier import RecalibratedClassifier
    from recalx_lightning.data import make_dataset
    from recalx_lightning.explain import Explanation, explain, explain_dataset
    from recalx_lightning.fitting import fit_temperatures
    from recalx_lightning.lightning import (
        ExplanationQualityCallback,
        PerturbationDataModule,
        ReCalXModule,
        ReCalXTrainer,
    )
    from recalx_lightning.metrics import KLCalibrationError, kl_calibration_error
    from recalx_lightning.models import create_model, load_reference_model
    from recalx_lightning.perturbation import Perturbation, make_baseline
    from recalx_lightning.report import CalibrationReport, evaluate_calibrators
