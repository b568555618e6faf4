"""The calibration pipeline without Lightning: perturbed samples → cached logits → fitted temperatures → report.

One sampling scheme serves ``python -m recalx_lightning fit``, :func:`calibrate` and the benchmarks: base sample
``index`` of a split gets all its B·M keep rows from one generator ``subset_generator(split_seed(seed, split),
index)``, bin 0 to B−1 in turn (:func:`draw_keep`), so subsets depend neither on workers, batch size, order nor
the number of processes. The frozen model runs once per perturbed sample; every calibrator is fitted on the same
cache (``global`` on the clean calibration images, classic temperature scaling).

Shapes: a cache holds ``logits`` (N, P, K) float32, ``levels`` (N, P) float64, ``labels`` (N,), ``index`` (N,)
base-sample indices and, when asked, ``clean`` (N, K) — N images, P = B·M perturbations each.

``ReCalXModule`` and ``PerturbationDataModule`` are thin Lightning wrappers around these functions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from recalx_lightning._checks import check_positive_int
from recalx_lightning.calibrators import CALIBRATORS, TemperatureCalibrator, make_calibrator
from recalx_lightning.fitting import CachedObjective, FitMethod, check_fit_method
from recalx_lightning.perturbation import LevelKind, Perturbation, check_level, subset_generator

SPLIT_SEEDS = {"calibration": 0, "evaluation": 1, "test": 2}


def split_seed(seed: int, split: str) -> int:
    """The subset seed of a split, ``seed · 7919 + SPLIT_SEEDS[split]``: calibration, evaluation and test
    subsets never share a stream."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"`split` must be one of {sorted(SPLIT_SEEDS)}, got {split!r}.")
    return seed * 7919 + SPLIT_SEEDS[split]


def split_samples(
    num_items: int, num_calibration: int, num_evaluation: int, seed: int = 0
) -> tuple[list[int], list[int]]:
    """Disjoint sorted calibration and evaluation indices: the first ``num_calibration`` and the next
    ``num_evaluation`` entries of ``randperm(num_items)`` seeded by ``seed`` (the split of ``fit``)."""
    needed = num_calibration + num_evaluation
    if num_items == 0:
        raise ValueError("the dataset is empty; give a split with samples.")
    if num_items < needed:
        raise ValueError(
            f"the split has {num_items} samples but num_calibration_samples + num_eval_samples = {needed}; "
            "lower them or use a larger split."
        )
    order = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[:num_calibration]), sorted(order[num_calibration:needed])


def draw_keep(
    perturbation: Perturbation,
    index: int,
    num_bins: int,
    subsets_per_bin: int,
    seed: int,
    informative: Tensor | None = None,
) -> Tensor:
    """All B·M keep rows (B·M, d) bool of base sample ``index``, bin-major, from ``subset_generator(seed, index)``;
    ``informative`` (d,) bins by the effective level. Identical in every process, worker and batch size."""
    generator = subset_generator(seed, index)
    rows = [perturbation.sample_keep(subsets_per_bin, b, num_bins, generator, informative) for b in range(num_bins)]
    return torch.cat(rows)


class PerturbedImages(Dataset):
    """Wraps a base dataset: item i → (x (*S), label (), keep (B·M, d) bool, index () of the base sample)."""

    def __init__(
        self,
        base: Dataset,
        indices: Sequence[int],
        perturbation: Perturbation,
        num_bins: int,
        subsets_per_bin: int,
        seed: int,
        level: LevelKind = "paper",
    ) -> None:
        self.base, self.indices = base, list(indices)
        self.perturbation, self.num_bins = perturbation, num_bins
        self.subsets_per_bin, self.seed = subsets_per_bin, seed
        self.level = check_level(level)

    def __len__(self) -> int:
        return len(self.indices)

    def keep_matrix(self, index: int, x: Tensor | None = None) -> Tensor:
        """All B·M keep rows of base sample ``index`` (its input ``x``, needed for the effective level)."""
        informative = None
        if self.level == "effective":
            if x is None:
                x = self.base[index][0]
            informative = self.perturbation.informative(x[None])[0]
        return draw_keep(self.perturbation, index, self.num_bins, self.subsets_per_bin, self.seed, informative)

    def __getitem__(self, item: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        index = self.indices[item]
        x, label = self.base[index][:2]
        return x, torch.as_tensor(label, dtype=torch.long), self.keep_matrix(index, x), torch.tensor(index)


def perturbed_logits(
    forward: Callable[[Tensor], Tensor], perturbation: Perturbation, x: Tensor, keep: Tensor, batch_size: int = 1024
) -> Tensor:
    """Logits of every perturbation of every input: x (b, *S), keep (b, P, d) → (b, P, K), in chunks of
    ``batch_size`` perturbed inputs (the memory bound is one chunk, whatever P)."""
    b, p, d = keep.shape
    rows = keep.reshape(b * p, d)
    image_of_row = torch.arange(b, device=x.device).repeat_interleave(p)
    chunks = []
    for start in range(0, b * p, batch_size):
        images = x[image_of_row[start : start + batch_size]]
        chunks.append(forward(perturbation.apply(images, rows[start : start + batch_size])))
    return torch.cat(chunks).view(b, p, -1)


def perturbation_levels(perturbation: Perturbation, x: Tensor, keep: Tensor, level: LevelKind = "paper") -> Tensor:
    """Levels (b, P) of the keep rows (b, P, d) of inputs x (b, *S) under ``level`` (paper or effective)."""
    informative = perturbation.informative_features(x, level)
    if informative is not None:
        informative = informative.unsqueeze(1).expand_as(keep).reshape(-1, keep.shape[-1])
    return perturbation.level(keep.reshape(-1, keep.shape[-1]), informative).view(keep.shape[:2])


def cache_batch(
    forward: Callable[[Tensor], Tensor],
    perturbation: Perturbation,
    batch: Sequence[Tensor],
    level: LevelKind = "paper",
    with_clean: bool = False,
    forward_batch_size: int = 1024,
) -> dict[str, Tensor]:
    """One loader batch (x, labels, keep, index) → its cache entry (see the module docstring)."""
    x, labels, keep, index = batch[:4]
    entry = {
        "index": index,
        "labels": labels,
        "logits": perturbed_logits(forward, perturbation, x, keep, forward_batch_size).float(),
        "levels": perturbation_levels(perturbation, x, keep, level).to(x.device),
    }
    if with_clean:
        entry["clean"] = forward(x).float()
    return entry


def join_cache(entries: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Concatenate cache entries, de-duplicate by ``index`` (DDP pads with repeats) and sort by it."""
    if not entries:
        raise RuntimeError("no samples were processed; is the data split empty?")
    joined = {key: torch.cat([entry[key] for entry in entries]) for key in entries[0]}
    return deduplicate(joined)


def deduplicate(cache: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Keep the first row of every ``index`` and sort the cache by it."""
    order = torch.argsort(cache["index"], stable=True)
    index = cache["index"][order]
    first = torch.ones_like(index, dtype=torch.bool)
    first[1:] = index[1:] != index[:-1]
    return {key: value[order][first] for key, value in cache.items()}


def flat_samples(cache: Mapping[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """(logits (N·P, K), labels (N·P,), levels (N·P,) float64): one row per perturbed sample."""
    num_images, per_image = cache["levels"].shape
    logits = cache["logits"].reshape(num_images * per_image, -1)
    return logits, cache["labels"].repeat_interleave(per_image), cache["levels"].reshape(-1).double()


def fit_calibrators(
    cache: Mapping[str, Tensor], calibrators: Mapping[str, TemperatureCalibrator], method: FitMethod = "auto"
) -> dict[str, dict[str, Any]]:
    """Fit each calibrator in place on the cache and return its diagnostics (``FitDiagnostics.to_dict`` plus the
    fitted ``temperatures``): ``global`` on the clean logits, the others on the perturbed logits and levels.
    ``newton`` falls back to ``auto`` for calibrators that are not piecewise constant (smooth)."""
    logits, labels, levels = flat_samples(cache)
    diagnostics = {}
    for kind, calibrator in calibrators.items():
        data = (cache["clean"], cache["labels"], None) if kind == "global" else (logits, labels, levels)
        kind_method = "auto" if method == "newton" and not calibrator.separable else method
        diagnostics[kind] = CachedObjective(*data, calibrator).fit(kind_method).diagnostics.to_dict()
        diagnostics[kind]["temperatures"] = calibrator.temperatures.tolist()
    return diagnostics


def collect(
    model: nn.Module | Callable[[Tensor], Tensor],
    images: PerturbedImages,
    *,
    with_clean: bool = False,
    batch_size: int = 16,
    forward_batch_size: int = 1024,
    device: str | torch.device | None = None,
    progress: bool = True,
    description: str = "perturbed logits",
) -> dict[str, Tensor]:
    """Run the frozen ``model`` once per perturbed sample of ``images`` (in order, no shuffling) → the cache."""
    check_positive_int(batch_size, "batch_size")
    check_positive_int(forward_batch_size, "forward_batch_size")
    device = torch.device(device) if device is not None else _model_device(model)

    @torch.no_grad()
    def forward(x: Tensor) -> Tensor:
        return model(x)

    loader = DataLoader(images, batch_size=batch_size, shuffle=False)
    if progress:
        from tqdm.auto import tqdm

        loader = tqdm(loader, desc=description, unit="batch")
    entries = []
    for batch in loader:
        batch = [t.to(device) for t in batch]
        entries.append({k: v.cpu() for k, v in cache_batch(
            forward, images.perturbation, batch, images.level, with_clean, forward_batch_size).items()})
    return join_cache(entries)


def _model_device(model: Any) -> torch.device:
    parameter = next(iter(model.parameters()), None) if isinstance(model, nn.Module) else None
    return parameter.device if parameter is not None else torch.device("cpu")


@dataclass
class Calibration:
    """What :func:`calibrate` returns: the fitted ``calibrators`` {kind: calibrator}, their ``diagnostics``
    {kind: dict}, the ``cache`` they were fitted on and the ``settings`` used."""

    calibrators: dict[str, TemperatureCalibrator]
    diagnostics: dict[str, dict[str, Any]]
    cache: dict[str, Tensor]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def calibrator(self) -> TemperatureCalibrator:
        """The main calibrator: ``binned`` when fitted, else the first one."""
        return self.calibrators.get("binned") or next(iter(self.calibrators.values()))

    @property
    def temperatures(self) -> dict[str, list[float]]:
        """{kind: per-bin temperatures}."""
        return {kind: calibrator.temperatures.tolist() for kind, calibrator in self.calibrators.items()}


def check_calibrator_kinds(kinds: Sequence[str]) -> list[str]:
    """The calibrator kinds, each one of ``global``, ``binned``, ``smooth``, at least one and no repeats."""
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    unknown = [k for k in kinds if k not in CALIBRATORS]
    if not kinds or unknown or len(set(kinds)) != len(kinds):
        raise ValueError(f"`calibrators` must be distinct names from {sorted(CALIBRATORS)}, got {kinds!r}.")
    return kinds


def perturbed_images(
    data: Dataset,
    perturbation: Perturbation,
    *,
    num_bins: int,
    subsets_per_bin: int,
    indices: Sequence[int] | None,
    seed: int,
    split: str,
    level: LevelKind,
) -> PerturbedImages:
    """Validated :class:`PerturbedImages` of ``data`` for ``split`` (one sample checked before any long work)."""
    check_positive_int(num_bins, "num_bins")
    check_positive_int(subsets_per_bin, "subsets_per_bin")
    level = check_level(level)
    indices = list(range(len(data))) if indices is None else sorted(int(i) for i in indices)
    if not indices:
        raise ValueError("`indices` selects no samples (or the dataset is empty); give at least one.")
    perturbation.check_input(data[indices[0]][0][None])
    perturbation.masked_counts(num_bins)  # every bin must hold a level
    return PerturbedImages(data, indices, perturbation, num_bins, subsets_per_bin, split_seed(seed, split), level)


def calibrate(
    model: nn.Module | Callable[[Tensor], Tensor],
    data: Dataset,
    perturbation: Perturbation,
    *,
    calibrators: Sequence[str] = ("binned",),
    num_bins: int = 10,
    subsets_per_bin: int = 10,
    indices: Sequence[int] | None = None,
    seed: int = 0,
    level: LevelKind = "paper",
    fit_method: FitMethod = "auto",
    min_temperature: float = 0.05,
    max_temperature: float = 100.0,
    batch_size: int = 16,
    forward_batch_size: int = 1024,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> Calibration:
    """Fit per-level temperatures of a frozen ``model`` on perturbed samples of ``data``, without Lightning.

    Args:
        model: the frozen classifier, inputs (n, *S) → logits (n, K) (put in eval mode by the caller).
        data: items ``(x (*S), label, ...)``; ``indices`` picks the calibration images (default: all).
        perturbation: the feature mask and baseline explanations will use.
        calibrators: kinds to fit on the same cache: ``binned`` (ReCalX), ``smooth``, ``global``.
        num_bins, subsets_per_bin: B level bins and M random subsets per image and bin.
        seed: subsets come from ``subset_generator(split_seed(seed, "calibration"), index)`` — the scheme of
            ``python -m recalx_lightning fit`` with ``data.seed``, so the same settings give the same temperatures.
        level: ``paper`` (share of features replaced) or ``effective`` (share of informative features replaced).
        fit_method: ``auto``/``newton`` (exact per-bin solve) or ``lbfgs`` (the paper's optimiser).
        batch_size: images per loader batch; forward_batch_size: perturbed inputs per model forward.

    Returns:
        :class:`Calibration`: fitted calibrators, fit diagnostics, the cache (logits, levels, labels, index,
        clean logits when ``global`` is fitted) and the settings. Every option is checked before the first forward.
    """
    kinds = check_calibrator_kinds(calibrators)
    check_fit_method(fit_method, "fit_method")
    fitted = {k: make_calibrator(k, num_bins=num_bins, min_temperature=min_temperature,
                                 max_temperature=max_temperature) for k in kinds}
    images = perturbed_images(data, perturbation, num_bins=num_bins, subsets_per_bin=subsets_per_bin,
                              indices=indices, seed=seed, split="calibration", level=level)
    cache = collect(model, images, with_clean="global" in kinds, batch_size=batch_size,
                    forward_batch_size=forward_batch_size, device=device, progress=progress,
                    description="calibration logits")
    diagnostics = fit_calibrators(cache, fitted, fit_method)
    settings = {"num_bins": num_bins, "subsets_per_bin": subsets_per_bin, "seed": seed, "level": images.level,
                "fit_method": fit_method, "indices": images.indices}
    return Calibration(fitted, diagnostics, cache, settings)


def evaluate(
    model: nn.Module | Callable[[Tensor], Tensor],
    data: Dataset,
    perturbation: Perturbation,
    calibrators: Mapping[str, TemperatureCalibrator | None],
    *,
    num_bins: int = 10,
    subsets_per_bin: int = 10,
    indices: Sequence[int] | None = None,
    seed: int = 0,
    split: str = "evaluation",
    level: LevelKind = "paper",
    batch_size: int = 16,
    forward_batch_size: int = 1024,
    device: str | torch.device | None = None,
    progress: bool = True,
    floor_seed: int = 0,
    **report_kwargs: Any,
):
    """The calibration report of ``calibrators`` on fresh perturbed samples of ``data`` (subsets from
    ``split_seed(seed, split)``; ``uncalibrated`` is added first when absent) — what ``fit`` writes after
    validation. ``floor_seed`` seeds the report's floors and standard errors; ``report_kwargs`` go to
    :func:`~recalx_lightning.report.evaluate_calibrators`."""
    from recalx_lightning.report import evaluate_calibrators

    images = perturbed_images(data, perturbation, num_bins=num_bins, subsets_per_bin=subsets_per_bin,
                              indices=indices, seed=seed, split=split, level=level)
    cache = collect(model, images, batch_size=batch_size, forward_batch_size=forward_batch_size, device=device,
                    progress=progress, description=f"{split} logits")
    named = dict(calibrators) if "uncalibrated" in calibrators else {"uncalibrated": None, **calibrators}
    return evaluate_calibrators(*flat_samples(cache), named, num_bins=num_bins, level=images.level, seed=floor_seed,
                                **report_kwargs)


def levels_under(images: PerturbedImages, cache: Mapping[str, Tensor], level: LevelKind) -> Tensor:
    """Levels (N, P) float64 of the perturbed samples in ``cache`` (from :func:`collect` on ``images``) under
    ``level``, row for row. The keep rows are redrawn from their generators, no model forward: samples drawn per
    bin of one level definition can be binned and scored by the other (paper λ vs effective λ_eff)."""
    level = check_level(level)
    rows = []
    for index in cache["index"].tolist():
        x = images.base[index][0]
        keep = images.keep_matrix(index, x)
        rows.append(perturbation_levels(images.perturbation, x[None], keep[None], level)[0])
    if not rows:
        raise ValueError("`cache` holds no samples; collect at least one image first.")
    return torch.stack(rows)
