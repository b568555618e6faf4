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

from recalx_lightning.explain import (
    alignment,
    boxes_to_masks,
    deletion_curve,
    explain,
    localization,
    paired_bootstrap_ci,
    pointing_game,
)
from recalx_lightning.module import run_directory

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
    unknown = [c for c in calibrators if c != "uncalibrated" and c not in module.calibrators]
    if unknown:
        raise ValueError(f"unknown calibrators {unknown}; the module has {['uncalibrated', *module.calibrators]}.")
    if any(i < 0 or i >= len(evaluation) for i in indices):
        raise ValueError(f"`indices` must lie in [0, {len(evaluation)}) (positions in the evaluation split).")
    device = module.device
    items = [evaluation[i] for i in indices]
    images = torch.stack([item[0] for item in items]).to(device)
    labels = torch.stack([item[1] for item in items]).to(device)
    hw = tuple(images.shape[-2:])
    notes = [image_annotations(base, evaluation.indices[i], hw) for i in indices]
    model = module.model
    runs: dict[str, tuple[Any, str]] = {}
    for name in calibrators:
        for mode in (("plain",) if name == "uncalibrated" else modes):
            runs[f"{name}/{mode}"] = (None if name == "uncalibrated" else module.calibrators[name], mode)
    maps, attributions, metrics = {}, {}, {}
    for key, (calibrator, mode) in runs.items():
        result = explain(model, images, perturbation, calibrator, target=labels, method=method, mode=mode,
                         num_samples=num_samples, perturbations_per_eval=perturbations_per_eval, seed=seed,
                         level=getattr(module, "level", "paper"))
        maps[key], attributions[key] = result.maps.cpu(), result.attributions.cpu()
        metrics[key] = _score(result, notes, model, images, labels, perturbation)
    summary = {key: _summarise(values, metrics.get(REFERENCE), seed) for key, values in metrics.items()}
    return {"images": images.cpu(), "labels": labels.cpu(), "maps": maps, "attributions": attributions,
            "metrics": metrics, "summary": summary}


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


def _summarise(values: dict[str, Tensor], reference: dict[str, Tensor] | None, seed: int) -> dict[str, dict]:
    out = {}
    for metric, v in values.items():
        entry = {"mean": float(v[~v.isnan()].mean()) if (~v.isnan()).any() else float("nan")}
        if reference is not None and metric in reference:
            ci = paired_bootstrap_ci(v, reference[metric], seed=seed)
            entry.update(diff=float(ci.mean_difference), low=float(ci.low), high=float(ci.high))
        out[metric] = entry
    return out


def heatmap_figure(result: dict[str, Any], max_images: int = 6):
    """Rows: images; columns: the input, then each explanation (red positive, blue negative)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(result["maps"])
    n = min(max_images, result["images"].shape[0])
    figure, axes = plt.subplots(n, len(keys) + 1, figsize=(2.2 * (len(keys) + 1), 2.2 * n), squeeze=False)
    for row in range(n):
        image = result["images"][row]
        shown = image.permute(1, 2, 0).squeeze(-1) if image.ndim == 3 else image.reshape(1, -1)
        shown = (shown - shown.min()) / (shown.max() - shown.min() + 1e-12)
        axes[row, 0].imshow(shown.numpy(), cmap="gray")
        axes[row, 0].set_title(f"label {int(result['labels'][row])}", fontsize=8)
        for column, key in enumerate(keys, start=1):
            heat = result["maps"][key][row].double()
            heat = heat.sum(0) if heat.ndim == 3 else heat.reshape(heat.shape[0] if heat.ndim == 2 else 1, -1)
            limit = float(heat.abs().max()) or 1.0
            axes[row, column].imshow(heat.numpy(), cmap="bwr", vmin=-limit, vmax=limit)
            if row == 0:
                axes[row, column].set_title(key, fontsize=8)
    for axis in axes.flat:
        axis.set_xticks([])
        axis.set_yticks([])
    figure.tight_layout()
    return figure


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
    heatmap_figure(result).savefig(paths["heatmaps"], dpi=100)
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
        self.num_images, self.calibrators, self.modes = num_images, tuple(calibrators), tuple(modes)
        self.method, self.num_samples, self.ppe, self.seed = method, num_samples, perturbations_per_eval, seed
        self.last_result: dict[str, Any] | None = None

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
