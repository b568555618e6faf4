"""Explanation quality at validation: do the recalibrated explanations localise and align better?

:func:`evaluate_explanations` explains a fixed set of evaluation images under each calibrator (and attribution
mode), scores every explanation (localisation in the box, pointing game, Spearman alignment with the reference
map — digit strokes or human attention — and the deletion AUC under one fixed evaluator, the bare model), and
reports paired differences to the uncalibrated plain explanation with bootstrap confidence intervals.
:class:`ExplanationQualityCallback` runs it after each validation and logs the numbers and a heatmap grid to
TensorBoard; ``python -m recalx_lightning explain`` runs it once and writes PNGs and JSON.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

from recalx_lightning._checks import check_positive_int
from recalx_lightning.explain import (
    alignment,
    boxes_to_masks,
    deletion_curve,
    explain_variants,
    localization,
    paired_bootstrap_ci,
    pointing_game,
)
from recalx_lightning.lightning.module import run_directory
from recalx_lightning.perturbation import subset_generator
from recalx_lightning.plots import display_image, heatmap_figure, readable_heatmaps  # noqa: F401 (re-exported)

REFERENCE = "uncalibrated/plain"


def image_annotations(dataset, index: int, image_hw: tuple[int, int]) -> dict[str, Tensor | None]:
    """Box mask and reference map (H, W) of base-dataset sample ``index``, where the dataset provides them."""
    if hasattr(dataset, "box") and hasattr(dataset, "stroke_mask"):
        box = torch.tensor([dataset.box(index)])
        return {"region": boxes_to_masks(box, image_hw)[0], "reference": dataset.stroke_mask(index).float()}
    if hasattr(dataset, "return_annotations"):
        previous, dataset.return_annotations = dataset.return_annotations, True
        try:
            item = dataset[index]
        finally:
            dataset.return_annotations = previous
        return {
            "region": item["box_mask"].bool() if item.get("has_box") else None,
            "reference": item["attention"].float() if item.get("has_attention") else None,
        }
    return {"region": None, "reference": None}


def check_explain_options(calibrators, modes, method, num_samples, perturbations_per_eval, module=None) -> None:
    """Raise naming the option and the allowed values, before any explanation work starts."""
    from recalx_lightning.calibrators import CALIBRATORS
    from recalx_lightning.explain.attribution import METHODS, MODES

    known = ["uncalibrated", *(module.calibrators if module is not None else CALIBRATORS)]
    unknown = [c for c in calibrators if c not in known]
    if isinstance(calibrators, str) or not calibrators or unknown:
        fix = " (set model.compare_calibrators: true to fit every kind)" if module is not None else ""
        raise ValueError(f"`calibrators` must be a non-empty list from {known}, got {calibrators!r}{fix}.")
    if isinstance(modes, str) or not modes or any(m not in MODES for m in modes):
        raise ValueError(f"`modes` must be a non-empty list from {list(MODES)}, got {modes!r}.")
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {list(METHODS)}, got {method!r}.")
    check_positive_int(num_samples, "num_samples")
    check_positive_int(perturbations_per_eval, "perturbations_per_eval")


def evaluate_explanations(
    module,
    datamodule,
    indices: Sequence[int],
    calibrators: Sequence[str] = ("uncalibrated", "binned"),
    modes: Sequence[str] = ("plain", "consistent"),
    method: str = "shapley_sampling",
    num_samples: int = 10,
    perturbations_per_eval: int = 64,
    seed: int = 0,
) -> dict[str, Any]:
    """Explain evaluation images ``indices`` (positions in the evaluation split) and score the explanations.

    Returns ``{"images", "maps": {key: (n, H, W)}, "attributions": {key: (n, d)}, "metrics": {key: {metric:
    (n,)}}, "summary": {key: {metric: {"mean", "diff", "low", "high"}}}}`` with keys ``<calibrator>/<mode>``;
    the uncalibrated model has one mode (plain: there is no temperature to make consistent).
    """
    evaluation = datamodule.datasets["evaluation"]
    base, perturbation = evaluation.base, datamodule.perturbation
    if any(i < 0 or i >= len(evaluation) for i in indices):
        raise ValueError(f"`indices` must lie in [0, {len(evaluation)}) (positions in the evaluation split).")
    variants = explanation_variants(module, calibrators, modes)
    device = module.device
    items = [evaluation[i] for i in indices]
    images = torch.stack([item[0] for item in items]).to(device)
    labels = torch.stack([item[1] for item in items]).to(device)
    hw = tuple(images.shape[-2:])
    notes = [image_annotations(base, evaluation.indices[i], hw) for i in indices]
    result = explain_images(module.model, images, labels, list(indices), notes, perturbation, variants, method,
                            num_samples, perturbations_per_eval, seed, module.level)
    metrics = result["metrics"]
    summary = {key: summarise_metrics(values, metrics.get(REFERENCE), seed) for key, values in metrics.items()}
    maps = {key: perturbation.to_pixels(values) for key, values in result["attributions"].items()}
    return {"images": images.cpu(), "labels": labels.cpu(), "maps": maps, "attributions": result["attributions"],
            "metrics": metrics, "summary": summary}


def explanation_variants(module, calibrators: Sequence[str], modes: Sequence[str]) -> dict[str, tuple[Any, str]]:
    """``{"<calibrator>/<mode>": (calibrator or None, mode)}``; the uncalibrated model has one mode (plain)."""
    unknown = [c for c in calibrators if c != "uncalibrated" and c not in module.calibrators]
    if unknown:
        raise ValueError(f"unknown calibrators {unknown}; the module has {['uncalibrated', *module.calibrators]}.")
    if not calibrators:
        raise ValueError("`calibrators` is empty; name at least one (e.g. [uncalibrated, binned]).")
    variants: dict[str, tuple[Any, str]] = {}
    for name in calibrators:
        for mode in (("plain",) if name == "uncalibrated" else modes):
            variants[f"{name}/{mode}"] = (None if name == "uncalibrated" else module.calibrators[name], mode)
    return variants


def image_seed(seed: int, index: int) -> int:
    """The seed of image ``index``'s permutations/samples: results do not depend on batch, order or world size."""
    return subset_generator(seed, index).initial_seed()


def explain_images(
    model,
    images: Tensor,
    labels: Tensor,
    indices: Sequence[int],
    notes: Sequence[dict[str, Tensor | None]],
    perturbation,
    variants: dict[str, tuple[Any, str]],
    method: str,
    num_samples: int,
    perturbations_per_eval: int,
    seed: int,
    level: str = "paper",
) -> dict[str, Any]:
    """Explain each image (n, *S) for its label under every variant from one pass, and score the explanations.

    Image i is explained on its own, seeded by :func:`image_seed` (seed, ``indices[i]``), at the ``level`` the
    temperatures were fitted on. Returns
    ``{"attributions": {key: (n, d)}, "metrics": {key: {metric: (n,)}}, "predictions": (n,), "evaluations": int}``
    (CPU, float64); ``evaluations`` counts the model's forwards of single inputs: one variant's explanation pass,
    whatever the number of variants, plus one clean forward per image (its prediction).
    """
    attributions: dict[str, list[Tensor]] = {key: [] for key in variants}
    metrics: dict[str, list[dict[str, Tensor]]] = {key: [] for key in variants}
    evaluations, predictions = 0, []
    for i, index in enumerate(indices):
        image, label = images[i : i + 1], labels[i : i + 1]
        explained = explain_variants(model, image, perturbation, variants, target=label, method=method,
                                     num_samples=num_samples, perturbations_per_eval=perturbations_per_eval,
                                     seed=image_seed(seed, int(index)), level=level)
        first = next(iter(explained.values()))
        evaluations += first.num_evaluations + image.shape[0]
        predictions.append(first.predictions.cpu())
        for key, result in explained.items():
            attributions[key].append(result.attributions.cpu())
            metrics[key].append(_score(result, notes[i : i + 1], model, image, label, perturbation))
    return {
        "attributions": {key: torch.cat(values) for key, values in attributions.items()},
        "metrics": {key: {m: torch.cat([row[m] for row in rows]) for m in rows[0]} for key, rows in metrics.items()},
        "predictions": torch.cat(predictions),
        "evaluations": evaluations,
    }


def _score(result, notes, model, images, labels, perturbation) -> dict[str, Tensor]:
    nan = torch.full((len(notes),), float("nan"), dtype=torch.float64)
    scores: dict[str, Tensor] = {}
    maps = result.maps.double()
    if maps.ndim == 4:
        maps = maps.sum(1)
    has_region = [n["region"] is not None for n in notes]
    if any(has_region):
        regions = torch.stack([n["region"] if n["region"] is not None else torch.zeros(maps.shape[1:], dtype=torch.bool)
                               for n in notes]).to(maps.device).bool()
        mask = torch.tensor(has_region, device=maps.device)
        scores["localization"] = torch.where(mask, localization(maps, regions), nan.to(maps.device)).cpu()
        scores["pointing_game"] = torch.where(mask, pointing_game(maps, regions), nan.to(maps.device)).cpu()
    has_reference = [n["reference"] is not None for n in notes]
    if any(has_reference):
        references = torch.stack([n["reference"] if n["reference"] is not None else torch.zeros(maps.shape[1:])
                                  for n in notes]).to(maps.device)
        mask = torch.tensor(has_reference, device=maps.device)
        for convention, values in alignment(maps, references).items():
            scores[f"alignment_{convention}"] = torch.where(mask, values, nan.to(maps.device)).cpu()
    with torch.no_grad():
        scores["deletion_auc"] = torch.as_tensor(
            deletion_curve(model, images, result.attributions, perturbation, labels).auc, dtype=torch.float64
        ).cpu()
    return scores


def summarise_metrics(values: dict[str, Tensor], reference: dict[str, Tensor] | None, seed: int,
                      min_pairs: int = 10) -> dict[str, dict]:
    """``{metric: {"mean", "diff", "low", "high", "num_pairs"}}``: the mean over images (NaN-free) and the paired
    difference to ``reference`` with a 95% bootstrap CI; with fewer than ``min_pairs`` pairs ``low``/``high``
    are ``None`` (an interval over so few images would mislead)."""
    out = {}
    for metric, v in values.items():
        entry: dict[str, Any] = {"mean": float(v[~v.isnan()].mean()) if (~v.isnan()).any() else float("nan")}
        if reference is not None and metric in reference:
            pairs = int((~(v - reference[metric]).isnan()).sum())
            entry["num_pairs"] = pairs
            if pairs:
                ci = paired_bootstrap_ci(v, reference[metric], seed=seed)
                entry.update(diff=float(ci.mean_difference), low=float(ci.low), high=float(ci.high))
                if pairs < min_pairs:
                    entry.update(low=None, high=None)
        out[metric] = entry
    return out


def flat_summary(summary: dict[str, dict[str, dict]], prefix: str = "explain") -> dict[str, float]:
    """``{prefix/<calibrator>/<mode>/<metric>[_diff]: value}`` for loggers."""
    flat = {}
    for key, metrics in summary.items():
        for metric, entry in metrics.items():
            flat[f"{prefix}/{key}/{metric}"] = entry["mean"]
            if "diff" in entry:
                flat[f"{prefix}/{key}/{metric}_diff"] = entry["diff"]
    return {k: v for k, v in flat.items() if v == v}


def write_explanations(result: dict[str, Any], directory: str | Path, stem: str = "explanations") -> dict[str, Path]:
    """Write ``<stem>.json`` (attributions, per-image metrics, summary) and ``<stem>_heatmaps.png``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    payload = {
        "labels": result["labels"].tolist(),
        "summary": result["summary"],
        "metrics": {k: {m: v.tolist() for m, v in ms.items()} for k, ms in result["metrics"].items()},
        "attributions": {k: v.tolist() for k, v in result["attributions"].items()},
    }
    paths = {"json": directory / f"{stem}.json", "heatmaps": directory / f"{stem}_heatmaps.png"}
    paths["json"].write_text(json.dumps(payload, indent=1, allow_nan=True))
    heatmap_figure(result).savefig(paths["heatmaps"], dpi=100, bbox_inches="tight")
    return paths


class ExplanationQualityCallback(L.Callback):
    """After each validation, explain ``num_images`` fixed evaluation images under each calibrator and log
    quality metrics (means and paired differences to uncalibrated with 95% bootstrap CIs) and a heatmap grid.

    Args:
        num_images: the first ``num_images`` images of the evaluation split (fixed across epochs).
        calibrators, modes, method, num_samples, perturbations_per_eval, seed: see :func:`evaluate_explanations`.
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
    ) -> None:
        super().__init__()
        if num_images < 1:
            raise ValueError(f"`num_images` must be >= 1, got {num_images}.")
        check_explain_options(calibrators, modes, method, num_samples, perturbations_per_eval)
        self.num_images, self.calibrators, self.modes = num_images, tuple(calibrators), tuple(modes)
        self.method, self.num_samples, self.ppe, self.seed = method, num_samples, perturbations_per_eval, seed
        self.last_result: dict[str, Any] | None = None

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        """Check the calibrator names against the module before any work (not after the whole fit).

        Nothing to check under ``predict``: the ``explain`` subcommand runs its own job, not this callback.
        """
        if stage == "predict":
            return
        check_explain_options(self.calibrators, self.modes, self.method, self.num_samples, self.ppe, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module) -> None:
        log_dir = run_directory(trainer)
        if trainer.sanity_checking or not trainer.is_global_zero or not bool(pl_module.fitted):
            return
        datamodule = trainer.datamodule
        count = min(self.num_images, len(datamodule.datasets["evaluation"]))
        result = evaluate_explanations(pl_module, datamodule, list(range(count)), self.calibrators, self.modes,
                                       self.method, self.num_samples, self.ppe, self.seed)
        self.last_result = result
        for logger in trainer.loggers:
            logger.log_metrics(flat_summary(result["summary"], "val_explain"), step=trainer.global_step)
            experiment = getattr(logger, "experiment", None)
            if experiment is not None and hasattr(experiment, "add_figure"):
                experiment.add_figure("val_explain/heatmaps", heatmap_figure(result), global_step=trainer.global_step)
        if log_dir:
            write_explanations(result, log_dir, stem="explanation_quality")
