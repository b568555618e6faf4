"""Explanation quality at validation: do the recalibrated explanations localise and align better?

:func:`evaluate_explanations` explains a fixed set of evaluation images under each calibrator (and attribution
mode), scores every explanation (localisation in the box, pointing game, Spearman alignment with the reference
map — digit strokes or human attention — and the deletion AUC under one fixed evaluator, the bare model), and
reports paired differences to the uncalibrated plain explanation with bootstrap confidence intervals.
:class:`ExplanationQualityCallback` runs it after each validation and logs the numbers and a heatmap grid to
TensorBoard; ``python -m recalx_lightning explain`` runs it once and writes PNGs and JSON.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import lightning as L
import torch

from recalx_lightning._checks import check_positive_int
from recalx_lightning.explain.study import (  # noqa: F401 (re-exported for old imports)
    REFERENCE,
    ExplainSettings,
    check_explain_options,
    explain_images,
    explanation_variants,
    flat_summary,
    image_annotations,
    image_seed,
    summarise_metrics,
    write_explanations,
)
from recalx_lightning.lightning.module import run_directory
from recalx_lightning.plots import display_image, heatmap_figure, readable_heatmaps  # noqa: F401 (re-exported)


def evaluate_explanations(
    module, datamodule, indices: Sequence[int], settings: ExplainSettings | None = None
) -> dict[str, Any]:
    """Explain evaluation images ``indices`` (positions in the evaluation split) and score the explanations.

    ``settings`` (default ``ExplainSettings()``) chooses calibrators, modes, method, samples and seed; the level
    is the module's.

    Returns ``{"images", "maps": {key: (n, H, W)}, "attributions": {key: (n, d)}, "metrics": {key: {metric:
    (n,)}}, "summary": {key: {metric: {"mean", "diff", "low", "high"}}}}`` with keys ``<calibrator>/<mode>``;
    the uncalibrated model has one mode (plain: there is no temperature to make consistent).
    """
    evaluation = datamodule.datasets["evaluation"]
    base, perturbation = evaluation.base, datamodule.perturbation
    if any(i < 0 or i >= len(evaluation) for i in indices):
        raise ValueError(f"`indices` must lie in [0, {len(evaluation)}) (positions in the evaluation split).")
    settings = replace(ExplainSettings() if settings is None else settings, level=module.level)
    variants = explanation_variants(module.calibrators, settings.calibrators, settings.modes)
    device = module.device
    items = [evaluation[i] for i in indices]
    images = torch.stack([item[0] for item in items]).to(device)
    labels = torch.stack([item[1] for item in items]).to(device)
    hw = tuple(images.shape[-2:])
    notes = [image_annotations(base, evaluation.indices[i], hw) for i in indices]
    result = explain_images(module.model, images, labels, list(indices), notes, perturbation, variants, settings)
    metrics = result["metrics"]
    summary = {key: summarise_metrics(values, metrics.get(REFERENCE), settings.seed) for key, values in metrics.items()}
    maps = {key: perturbation.to_pixels(values) for key, values in result["attributions"].items()}
    return {"images": images.cpu(), "labels": labels.cpu(), "maps": maps, "attributions": result["attributions"],
            "metrics": metrics, "summary": summary}


class ExplanationQualityCallback(L.Callback):
    """After each validation, explain ``num_images`` fixed evaluation images under each calibrator and log
    quality metrics (means and paired differences to uncalibrated with 95% bootstrap CIs) and a heatmap grid.

    Args:
        num_images: the first ``num_images`` images of the evaluation split (fixed across epochs).
        num_heatmaps: how many of them the heatmap grid draws.
        calibrators, modes, method, num_samples, perturbations_per_eval, seed: see
            :class:`~recalx_lightning.explain.ExplainSettings` (held as ``settings``).
    """

    def __init__(
        self,
        num_images: int = 16,
        calibrators: Sequence[str] = ("uncalibrated", "binned"),
        modes: Sequence[str] = ("plain", "consistent"),
        method: str = "shapley_sampling",
        num_samples: int = 10,
        perturbations_per_eval: int = 64,
        seed: int = 0,
        num_heatmaps: int = 6,
    ) -> None:
        super().__init__()
        self.settings = ExplainSettings(calibrators, modes, method, num_samples, perturbations_per_eval, seed)
        if num_images < 1:
            raise ValueError(f"`num_images` must be >= 1, got {num_images}.")
        check_positive_int(num_heatmaps, "num_heatmaps")
        self.num_images, self.num_heatmaps = num_images, num_heatmaps
        self.last_result: dict[str, Any] | None = None

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        """Check the calibrator names against the module before any work (not after the whole fit).

        Nothing to check under ``predict``: the ``explain`` subcommand runs its own job, not this callback.
        """
        if stage == "predict":
            return
        self.settings.check_calibrators(list(pl_module.calibrators))

    def on_validation_end(self, trainer: L.Trainer, pl_module) -> None:
        log_dir = run_directory(trainer)
        if trainer.sanity_checking or not trainer.is_global_zero or not bool(pl_module.fitted):
            return
        datamodule = trainer.datamodule
        count = min(self.num_images, len(datamodule.datasets["evaluation"]))
        result = evaluate_explanations(pl_module, datamodule, list(range(count)), self.settings)
        self.last_result = result
        for logger in trainer.loggers:
            logger.log_metrics(flat_summary(result["summary"], "val_explain"), step=trainer.global_step)
            experiment = getattr(logger, "experiment", None)
            if experiment is not None and hasattr(experiment, "add_figure"):
                experiment.add_figure("val_explain/heatmaps", heatmap_figure(result, max_images=self.num_heatmaps),
                                      global_step=trainer.global_step)
        if log_dir:
            write_explanations(result, log_dir, stem="explanation_quality", num_heatmaps=self.num_heatmaps)
