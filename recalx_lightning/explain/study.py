"""The explanation study over images, without Lightning: variants, per-image explanations and scores, summaries.

Every ``<calibrator>/<mode>`` variant of an image is explained from one pass of model evaluations, seeded by
(``seed``, the image's position) so results depend neither on batch, order nor devices, and scored by
localisation in the object box, pointing game, Spearman alignment with the reference map (digit strokes or human
attention) and the deletion AUC under one fixed evaluator, the bare model. :func:`explain_dataset` runs it over a
dataset; ``python -m recalx_lightning explain`` and :class:`~recalx_lightning.lightning.ExplanationQualityCallback`
run the same per-image functions, all configured by one :class:`ExplainSettings`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from recalx_lightning._checks import check_positive_int
from recalx_lightning.calibrators import TemperatureCalibrator
from recalx_lightning.explain.attribution import explain_variants
from recalx_lightning.explain.quality import (
    alignment,
    boxes_to_masks,
    deletion_curve,
    localization,
    paired_bootstrap_ci,
    pointing_game,
)
from recalx_lightning.perturbation import LevelKind, Perturbation, check_level, subset_generator
from recalx_lightning.plots import heatmap_figure

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


def check_explain_options(
    calibrators, modes, method, num_samples, perturbations_per_eval, available: Sequence[str] | None = None
) -> None:
    """Raise naming the option and the allowed values, before any explanation work starts; ``available``: the
    fitted calibrator kinds (default: every kind)."""
    from recalx_lightning.calibrators import CALIBRATORS
    from recalx_lightning.explain.attribution import METHODS, MODES

    known = ["uncalibrated", *(available if available is not None else CALIBRATORS)]
    unknown = [c for c in calibrators if c not in known]
    if isinstance(calibrators, str) or not calibrators or unknown:
        fix = " (set model.compare_calibrators: true to fit every kind)" if available is not None else ""
        raise ValueError(f"`calibrators` must be a non-empty list from {known}, got {calibrators!r}{fix}.")
    if isinstance(modes, str) or not modes or any(m not in MODES for m in modes):
        raise ValueError(f"`modes` must be a non-empty list from {list(MODES)}, got {modes!r}.")
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {list(METHODS)}, got {method!r}.")
    check_positive_int(num_samples, "num_samples")
    check_positive_int(perturbations_per_eval, "perturbations_per_eval")


@dataclass(frozen=True)
class ExplainSettings:
    """What an explanation study is asked to compute, checked once, when it is built.

    Attributes:
        calibrators: the calibrators explained: ``uncalibrated`` and fitted kinds (``global``, ``binned``,
            ``smooth``); a non-empty list, kept as a tuple.
        modes: attribution modes of each calibrated model, from ``plain`` and ``consistent`` (the uncalibrated
            model is explained once, plain); kept as a tuple.
        method: the attribution method, one of :data:`~recalx_lightning.explain.METHODS`.
        num_samples: permutations (Shapley sampling) or sampled coalitions (LIME, KernelSHAP) per image;
            unused by the exact and ablation methods.
        perturbations_per_eval: coalitions evaluated per model forward (memory vs. speed; results do not
            depend on it).
        seed: image ``p`` draws its permutations/samples from (``seed``, ``p``), see :func:`image_seed`.
        level: the level definition the temperatures were fitted on (``paper`` or ``effective``).
    """

    calibrators: Sequence[str] = ("uncalibrated", "binned")
    modes: Sequence[str] = ("plain", "consistent")
    method: str = "shapley_sampling"
    num_samples: int = 25
    perturbations_per_eval: int = 64
    seed: int = 0
    level: LevelKind = "paper"

    def __post_init__(self) -> None:
        self.check_calibrators()
        check_level(self.level)
        object.__setattr__(self, "calibrators", tuple(self.calibrators))
        object.__setattr__(self, "modes", tuple(self.modes))

    def check_calibrators(self, fitted: Sequence[str] | None = None) -> None:
        """Raise unless every option is valid and every calibrator named is ``uncalibrated`` or one of the
        ``fitted`` kinds (default: any kind)."""
        check_explain_options(self.calibrators, self.modes, self.method, self.num_samples,
                              self.perturbations_per_eval, fitted)


def explanation_variants(
    fitted: Mapping[str, TemperatureCalibrator], calibrators: Sequence[str], modes: Sequence[str]
) -> dict[str, tuple[Any, str]]:
    """``{"<calibrator>/<mode>": (calibrator or None, mode)}`` for the names in ``calibrators`` (``uncalibrated``
    or a key of ``fitted``); the uncalibrated model has one mode (plain)."""
    unknown = [c for c in calibrators if c != "uncalibrated" and c not in fitted]
    if unknown:
        raise ValueError(f"unknown calibrators {unknown}; the module has {['uncalibrated', *fitted]}.")
    if not calibrators:
        raise ValueError("`calibrators` is empty; name at least one (e.g. [uncalibrated, binned]).")
    variants: dict[str, tuple[Any, str]] = {}
    for name in calibrators:
        for mode in (("plain",) if name == "uncalibrated" else modes):
            variants[f"{name}/{mode}"] = (None if name == "uncalibrated" else fitted[name], mode)
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
    settings: ExplainSettings,
) -> dict[str, Any]:
    """Explain each image (n, *S) for its label under every variant from one pass, and score the explanations.

    Image i is explained on its own, seeded by :func:`image_seed` (``settings.seed``, ``indices[i]``), with the
    method, samples and level of ``settings`` (its calibrators and modes are already in ``variants``). Returns
    ``{"attributions": {key: (n, d)}, "metrics": {key: {metric: (n,)}}, "predictions": (n,), "evaluations": int}``
    (CPU, float64); ``evaluations`` counts the model's forwards of single inputs: one variant's explanation pass,
    whatever the number of variants, plus one clean forward per image (its prediction).
    """
    attributions: dict[str, list[Tensor]] = {key: [] for key in variants}
    metrics: dict[str, list[dict[str, Tensor]]] = {key: [] for key in variants}
    evaluations, predictions = 0, []
    for i, index in enumerate(indices):
        image, label = images[i : i + 1], labels[i : i + 1]
        explained = explain_variants(model, image, perturbation, variants, target=label, method=settings.method,
                                     num_samples=settings.num_samples,
                                     perturbations_per_eval=settings.perturbations_per_eval,
                                     seed=image_seed(settings.seed, int(index)), level=settings.level)
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


def write_explanations(
    result: dict[str, Any], directory: str | Path, stem: str = "explanations", num_heatmaps: int = 6
) -> dict[str, Path]:
    """Write ``<stem>.json`` (attributions, per-image metrics, summary) and ``<stem>_heatmaps.png`` (the first
    ``num_heatmaps`` images)."""
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
    heatmap_figure(result, max_images=num_heatmaps).savefig(paths["heatmaps"], dpi=100, bbox_inches="tight")
    return paths


def explain_dataset(
    model: Any,
    split: Any,
    perturbation: Perturbation,
    calibrators: Mapping[str, TemperatureCalibrator],
    *,
    positions: Sequence[int] | None = None,
    settings: ExplainSettings | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Explain and score images of ``split`` under every ``<name>/<mode>`` variant, without Lightning.

    Args:
        model: the frozen classifier (on the device the images should go to).
        split: items ``(x (*S), label, ...)``; a :class:`~recalx_lightning.calibration.PerturbedImages` split reads
            boxes and reference maps from its base dataset (digits, ImageNet with annotations).
        calibrators: fitted calibrators by kind (e.g. ``calibrate(...).calibrators`` or a module's).
        positions: positions in ``split`` to explain (default: all); image ``p`` is seeded by ``(seed, p)``, as in
            ``python -m recalx_lightning explain`` on the same split, so both give the same attributions.
        settings: calibrators explained (names from ``calibrators``), modes, method, samples, seed and the level
            the temperatures were fitted on (default: ``ExplainSettings()``, the ``explain`` subcommand's).
        progress: show a progress bar over images.

    Returns:
        ``{"positions" (n,), "labels" (n,), "predictions" (n,), "attributions": {key: (n, d)}, "metrics": {key:
        {metric: (n,)}}, "summary": {key: {metric: {...}}}, "evaluations"}``. Attributions are kept per feature
        (n · d values per variant, 0.8 MB per 1,000 images at d = 196); ``perturbation.to_pixels`` spreads any of
        them over the pixels. For a whole dataset on disk, with resume and several GPUs, use the ``explain``
        subcommand (``ReCalXTrainer.explain``), which streams shards.
    """
    settings = ExplainSettings() if settings is None else settings
    settings.check_calibrators(list(calibrators))
    positions = list(range(len(split))) if positions is None else [int(p) for p in positions]
    if not positions or any(p < 0 or p >= len(split) for p in positions):
        raise ValueError(f"`positions` must be a non-empty selection from [0, {len(split)}), got {positions!r}.")
    variants = explanation_variants(calibrators, settings.calibrators, settings.modes)
    parameter = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    device = parameter.device if parameter is not None else torch.device("cpu")
    base = getattr(split, "base", split)
    rows = positions
    if progress:
        from tqdm.auto import tqdm

        rows = tqdm(positions, desc="explaining", unit="image")
    parts, labels = [], []
    for position in rows:
        item = split[position]
        image = item[0][None].to(device)
        label = torch.as_tensor(item[1], dtype=torch.long).view(1).to(device)
        labels.append(label.cpu())
        base_index = split.indices[position] if hasattr(split, "indices") else position
        notes = [image_annotations(base, base_index, tuple(image.shape[-2:]))]
        parts.append(explain_images(model, image, label, [position], notes, perturbation, variants, settings))
    attributions = {key: torch.cat([p["attributions"][key] for p in parts]) for key in variants}
    metrics = {key: {m: torch.cat([p["metrics"][key][m] for p in parts]) for m in parts[0]["metrics"][key]}
               for key in variants}
    return {
        "positions": torch.tensor(positions),
        "labels": torch.cat(labels),
        "predictions": torch.cat([p["predictions"] for p in parts]),
        "attributions": attributions,
        "metrics": metrics,
        "summary": {key: summarise_metrics(values, metrics.get(REFERENCE), settings.seed)
                    for key, values in metrics.items()},
        "evaluations": sum(p["evaluations"] for p in parts),
    }
