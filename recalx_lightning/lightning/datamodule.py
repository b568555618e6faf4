"""PerturbationDataModule: clean images + deterministic keep matrices for calibration and evaluation.

Each item is one *image* with all of its perturbations::

    (x (*S), label (), keep (B·M, d) bool, index ())

where row ``b·M + j`` of ``keep`` is the j-th random subset of level bin b, drawn from a generator seeded by
(seed, split, index) — so subsets do not depend on workers, batch size or world size. With ``level="effective"``
the bins are bins of the effective level λ_eff of that image (its informative features are computed from the
image and the baseline in the loader): see :meth:`~recalx_lightning.perturbation.Perturbation.sample_keep` for
how every bin is filled, including images with fewer informative features than bins. The module applies the
perturbations on its device (``Perturbation.apply``): per image, one image and B·M·d booleans travel from the
loader to the device instead of B·M perturbed copies (100× less host→device traffic at the paper's M = 10,
B = 10), and the workers only decode and transform. On CPU, where there is no transfer, both placements took
about the same time (2.86 s vs 2.95 s for 10,000 digits samples, ``benchmarks/bench_lightning.py``).

Calibration uses ``num_calibration_samples`` images (paper: N = 200) × ``subsets_per_bin`` (M = 10) per bin;
evaluation uses a disjoint set of ``num_eval_samples`` images × ``eval_subsets_per_bin`` fresh subsets per bin
(paper: ≥ 5,000 per level).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from recalx_lightning._checks import check_positive_int
from recalx_lightning.calibration import PerturbedImages, split_samples, split_seed
from recalx_lightning.checkpoints import data_signature
from recalx_lightning.perturbation import (
    LevelKind,
    Perturbation,
    check_level,
    make_baseline,
    patch_mask,
)

if TYPE_CHECKING:
    from recalx_lightning.lightning.module import ReCalXModule
    from recalx_lightning.models import ModelInfo

FeatureKind = Literal["patches", "pixels", "tabular"]

class PerturbationDataModule(L.LightningDataModule):
    """Perturbation sampling around any base dataset (embedded digits, tabular sets, ImageNet validation).

    Args:
        dataset: a name for :func:`recalx_lightning.data.make_dataset` (``digits``, ``cluttered_digits``,
            ``breast_cancer``, ``wine``, ``synthetic``, ``imagenet``).
        dataset_kwargs: extra arguments of that dataset (``root``, ``class_index``, ... for ImageNet). Image
            folders get the model's own preprocessing as ``transform`` unless one is given.
        split: which split of the base dataset the calibration and evaluation images come from.
        features: ``patches`` (``patch_size`` or ``grid``; ``grid="model"`` uses a ViT's patch grid),
            ``pixels`` or ``tabular`` (one feature per column).
        baseline, baseline_kwargs, baseline_space: see :func:`recalx_lightning.perturbation.make_baseline`;
            ``baseline_space="raw"`` takes the model's mean/std.
        num_bins: B level bins. subsets_per_bin: M subsets per calibration image and bin.
        num_workers: DataLoader workers; ``"auto"`` fits the machine (see :meth:`resolved_num_workers`).
        num_calibration_samples: N calibration images. num_eval_samples / eval_subsets_per_bin: evaluation
            images and subsets per image and bin (disjoint from the calibration images).
        test_split: split used by ``trainer.test`` (fresh images, same sampling as evaluation).
        level: the perturbation level that bins are made of and temperatures are fitted on: ``"paper"``
            (share of features replaced, ReCalX) or ``"effective"`` (share of each image's informative
            features replaced; see :mod:`recalx_lightning.perturbation`). The module reads it from here.
        seed: seeds every subset (with the split and the sample index).
    """

    def __init__(
        self,
        dataset: str = "digits",
        dataset_kwargs: dict[str, Any] | None = None,
        split: str = "val",
        test_split: str = "test",
        features: FeatureKind = "patches",
        patch_size: int | None = 4,
        grid: list[int] | str | None = None,
        baseline: float | str = "zeros",
        baseline_kwargs: dict[str, Any] | None = None,
        baseline_space: Literal["input", "raw"] = "input",
        num_bins: int = 10,
        subsets_per_bin: int = 10,
        num_calibration_samples: int = 200,
        num_eval_samples: int = 200,
        eval_subsets_per_bin: int = 25,
        batch_size: int = 8,
        num_workers: int | Literal["auto"] = "auto",
        seed: int = 0,
        level: LevelKind = "paper",
    ) -> None:
        super().__init__()
        check_level(level, "data.level")
        for name in ("num_bins", "subsets_per_bin", "num_calibration_samples", "num_eval_samples",
                     "eval_subsets_per_bin", "batch_size"):
            check_positive_int(locals()[name], name)
        if num_workers != "auto":
            check_positive_int(num_workers, "num_workers", minimum=0)
        if features not in ("patches", "pixels", "tabular"):
            raise ValueError(f"`features` must be 'patches', 'pixels' or 'tabular', got {features!r}.")
        if features == "patches" and (patch_size is None) == (grid is None):
            raise ValueError("features='patches' needs exactly one of `patch_size` or `grid` (e.g. grid: model).")
        if baseline_space == "input":
            make_baseline(baseline, **(baseline_kwargs or {}))  # a bad baseline fails before the model is built
        from recalx_lightning.data import DATASETS, make_dataset

        if dataset not in DATASETS:
            make_dataset(dataset)  # raises with the closest known names
        if dataset == "imagenet":
            _check_paths(dataset_kwargs or {}, required=("root", "class_index"),
                         optional=("annotations_dir", "attention_dir", "labels", "ground_truth", "ilsvrc_synsets",
                                   "devkit", "loc_solution"))
        self.save_hyperparameters()
        self.perturbation: Perturbation | None = None
        self.datasets: dict[str, PerturbedImages] = {}
        self.model_info: ModelInfo | None = None
        self.model_transform: Callable | None = None

    def use_model(self, info: ModelInfo | None, transform: Callable | None = None) -> None:
        """Take the model's side of the hand-over (:func:`connect`): its info
        (mean/std for ``baseline_space: raw``, the patch grid for ``grid: model``) and its preprocessing (the
        transform of image folders)."""
        if self.datasets and _preprocessing(info) != _preprocessing(self.model_info):
            raise ValueError(
                "the data module was set up for a model with other preprocessing (normalisation, input size or "
                f"patch grid): {self.model_info} vs {info}; create a new data module for this model."
            )
        self.model_info, self.model_transform = info, transform

    # setup -------------------------------------------------------------------------------------------
    def base_dataset(self, split: str) -> Dataset:
        """The base dataset of ``split`` (with the model's preprocessing for image folders)."""
        from recalx_lightning.data import make_dataset

        kwargs = dict(self.hparams.dataset_kwargs or {})
        if self.hparams.dataset == "imagenet" and "transform" not in kwargs and self.model_transform is not None:
            kwargs["transform"] = self.model_transform
        return make_dataset(self.hparams.dataset, split, **kwargs)

    def build_perturbation(self, sample: Tensor) -> Perturbation:
        """The perturbation for inputs shaped like ``sample`` (one item, no batch dimension)."""
        hp, info = self.hparams, self.model_info
        baseline_kwargs = dict(hp.baseline_kwargs or {})
        if hp.baseline_space == "raw":
            if info is None or info.mean is None:
                raise ValueError("baseline_space='raw' needs a model with a known normalisation (mean/std).")
            baseline_kwargs.update(space="raw", mean=info.mean, std=info.std)
        baseline = make_baseline(hp.baseline, **baseline_kwargs)
        if hp.features == "tabular":
            if sample.ndim != 1:
                raise ValueError(f"features='tabular' needs (F,) inputs, got one input of shape {tuple(sample.shape)}.")
            return Perturbation.tabular(sample.shape[0], baseline)
        if sample.ndim != 3:
            raise ValueError(
                f"features={hp.features!r} needs (C, H, W) images, got one input of shape {tuple(sample.shape)}; "
                "use features: tabular for tabular data."
            )
        size = tuple(sample.shape[-2:])
        if hp.features == "pixels":
            return Perturbation.pixels(size, baseline)
        grid = hp.grid
        if grid == "model":
            if info is None or info.patch_grid is None:
                raise ValueError("grid='model' needs a ViT-like model with a patch grid; set `patch_size` instead.")
            grid = info.patch_grid
        if hp.patch_size is not None and (hp.patch_size > min(size)):
            raise ValueError(f"`patch_size` {hp.patch_size} does not fit images of size {size}.")
        return Perturbation(patch_mask(size, patch_size=hp.patch_size, grid=grid), baseline)

    def setup(self, stage: str | None = None) -> None:
        """Under a Lightning ``Trainer`` this is the first hook that sees the module too: it connects them
        (:func:`connect`), which hands this data module the model's side and
        then builds it (:meth:`build`)."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        if hasattr(module, "use_data"):
            connect(module, self)
        else:
            self.build()

    def build(self) -> None:
        """Build the perturbation and the calibration/evaluation splits (once)."""
        if self.datasets:
            return
        hp = self.hparams
        base = self.base_dataset(hp.split)
        if len(base) == 0:
            raise ValueError(f"dataset {hp.dataset!r} split {hp.split!r} is empty.")
        try:
            calibration, evaluation = split_samples(len(base), hp.num_calibration_samples, hp.num_eval_samples,
                                                    hp.seed)
        except ValueError as error:
            raise ValueError(f"split {hp.split!r} of {hp.dataset!r}: {error}") from None
        sample = base[calibration[0]][0]
        self.perturbation = self.build_perturbation(sample)
        self.perturbation.check_input(sample[None])
        self.perturbation.masked_counts(hp.num_bins)  # every bin must hold a level
        self.datasets = {
            "calibration": self._perturbed(base, calibration, hp.subsets_per_bin, "calibration"),
            "evaluation": self._perturbed(base, evaluation, hp.eval_subsets_per_bin, "evaluation"),
        }

    def _perturbed(self, base: Dataset, indices: list[int], subsets: int, split: str) -> PerturbedImages:
        return PerturbedImages(base, sorted(indices), self.perturbation, self.hparams.num_bins, subsets,
                               split_seed(self.hparams.seed, split), self.hparams.level)

    def _test_dataset(self) -> PerturbedImages:
        if "test" not in self.datasets:
            hp = self.hparams
            base = self.base_dataset(hp.test_split)
            count = min(len(base), hp.num_eval_samples)
            order = torch.randperm(len(base), generator=torch.Generator().manual_seed(hp.seed)).tolist()[:count]
            self.datasets["test"] = self._perturbed(base, order, hp.eval_subsets_per_bin, "test")
        return self.datasets["test"]

    # loaders -----------------------------------------------------------------------------------------
    def resolved_num_workers(self) -> int:
        """``num_workers``, with ``"auto"`` = 0 for in-memory datasets (workers would only add start-up time) and,
        for image folders, Lightning's suggestion for this machine (CPUs per device − 1), at most 8."""
        if self.hparams.num_workers != "auto":
            return int(self.hparams.num_workers)
        if self.hparams.dataset != "imagenet":
            return 0
        from lightning.fabric.utilities.data import suggested_max_num_workers

        devices = getattr(self.trainer, "num_devices", 1) if self.trainer is not None else 1
        return min(8, suggested_max_num_workers(devices))

    def _loader(self, dataset: Dataset) -> DataLoader:
        workers = self.resolved_num_workers()
        return DataLoader(dataset, batch_size=self.hparams.batch_size, shuffle=False,
                          num_workers=workers, persistent_workers=workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["calibration"])

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["evaluation"])

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._test_dataset())



def connect(module: ReCalXModule, datamodule: PerturbationDataModule) -> None:
    """The one hand-over between a :class:`~recalx_lightning.lightning.module.ReCalXModule` and its data module
    (idempotent; a ``ValueError`` names the setting that differs, before any backbone forward).

    Each side owns its settings: the module owns the model (its :class:`~recalx_lightning.models.ModelInfo` and
    preprocessing), the data module everything about perturbing it (features, baseline, ``num_bins``,
    ``level``, the subsets). Neither reads the other through the trainer. This function

    1. checks that both agree on ``num_bins`` (the CLI links ``model.init_args.num_bins`` to
       ``data.init_args.num_bins``, so there only the data side is set);
    2. hands the data module the model's info and preprocessing (a ``raw`` baseline needs the model's mean/std,
       ``grid: model`` its patch grid, image folders its transform), and the data module builds the perturbation;
    3. checks the data against the model (class count, input shape) and hands the module the perturbation, the
       level definition and the data's part of the checkpoint signature.

    A Lightning ``Trainer`` (plain or :class:`ReCalXTrainer`) calls it from :meth:`PerturbationDataModule.setup`,
    the first hook that sees both; outside a trainer (``explain``, scripts) call it directly.
    """
    if datamodule.hparams.num_bins != module.hparams.num_bins:
        raise ValueError(
            f"model.num_bins = {module.hparams.num_bins} but data.num_bins = {datamodule.hparams.num_bins}; "
            "set num_bins once, on the data (the command line links the model's to it)."
        )
    datamodule.use_model(module.model_info, module.model_transform)
    datamodule.build()
    calibration = datamodule.datasets["calibration"]
    from recalx_lightning.models.info import check_model_data

    check_model_data(module.model, calibration.base)
    sample_shape = tuple(calibration[0][0].shape)
    if sample_shape != tuple(module.model_info.input_size):
        raise ValueError(
            f"the data yields inputs of shape {sample_shape} but {module.hparams.model!r} expects "
            f"{tuple(module.model_info.input_size)}; use a model built for this data (or resize the data)."
        )
    module.use_data(datamodule.perturbation, datamodule.hparams.level,
                    data_signature(datamodule.perturbation, datamodule.hparams))


def _preprocessing(info: ModelInfo | None) -> ModelInfo | None:
    """What the perturbation and the image transform depend on in a model's info (its name aside)."""
    return None if info is None else dataclasses.replace(info, name=None)


def _check_paths(kwargs: dict[str, Any], required: tuple[str, ...], optional: tuple[str, ...]) -> None:
    """Fail before any work when a data path is missing or does not exist."""
    from pathlib import Path

    for key in (*required, *optional):
        value = kwargs.get(key)
        if value is None:
            if key in required:
                raise ValueError(f"`data.dataset_kwargs.{key}` is required for ImageNet: set it to the local path.")
            continue
        if isinstance(value, (str, Path)) and not Path(value).exists():
            raise ValueError(f"`data.dataset_kwargs.{key}` = {str(value)!r} does not exist; check the path.")
