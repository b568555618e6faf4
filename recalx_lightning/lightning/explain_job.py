"""Explaining a whole split through Lightning's predict loop: streamed, resumable, the same on any world size.

:class:`ExplanationJob` is the LightningModule that ``python -m recalx_lightning explain`` hands to
``trainer.predict``. Each batch of images is explained under every requested ``<calibrator>/<mode>`` from one
pass of model evaluations (:func:`~recalx_lightning.explain.explain_variants`), each image with its own seed
(seed, image index), and written at once to a shard file of its rank (``<output_dir>/shards``, atomically:
a temporary file renamed into place). Memory therefore does not grow with the number of images, and a run
that is killed loses at most its unfinished batches: rerunning the same command skips the images already in
a shard. Under DDP Lightning splits the images with its (unrepeated) distributed sampler; the merge keeps one
copy per image index, so no image is duplicated or dropped whatever the padding. At the end rank 0 merges the
shards, sorted by image index, into ``attributions.pt``, ``explanations.json`` (``model_evaluations_this_run``:
the explanation pass plus one clean forward (the prediction) per image explained by this invocation; the
deletion curves behind ``deletion_auc`` are not counted), ``explanations.md`` and ``explanations_heatmaps.png``.
The files, their format and the refusal to resume with other settings live in
:mod:`recalx_lightning.explain.store`, without Lightning.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from torch import Tensor
from torch.utils.data import Dataset

from recalx_lightning.explain import store
from recalx_lightning.explain.study import ExplainSettings, explain_images, image_annotations


class SplitImages(Dataset):
    """``(image, label, position)`` for the chosen positions of a split (no perturbation subsets drawn)."""

    def __init__(self, split, positions: Sequence[int]) -> None:
        self.split, self.positions = split, list(positions)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, item: int) -> tuple[Tensor, Tensor, Tensor]:
        position = self.positions[item]
        x, label = self.split.base[self.split.indices[position]][:2]
        return x, torch.as_tensor(label, dtype=torch.long), torch.tensor(position)


# --------------------------------------------------------------------------------------------- job
class ExplanationJob(L.LightningModule):
    """Explain batches of ``(image, label, position)`` in ``predict_step`` and stream them to shard files.

    Args:
        module: a fitted :class:`~recalx_lightning.ReCalXModule` (backbone + calibrators).
        split: the :class:`~recalx_lightning.lightning.datamodule.PerturbedImages` split explained (annotations, names).
        perturbation: the data module's perturbation (d features).
        variants: ``{"<calibrator>/<mode>": (calibrator or None, mode)}``.
        selection: the positions the merged result holds (sorted).
        output_dir: where shards and merged files go.
        settings: method, samples, seed and level of the explanations.
        record: what the result depends on (:func:`~recalx_lightning.explain.store.settings_record`; written to
            the merged JSON).
        num_heatmaps: images drawn in the heatmap figure (0: none).
    """

    def __init__(self, module, split, perturbation, variants, selection: Sequence[int], output_dir: str | Path,
                 settings: ExplainSettings, record: dict[str, Any], num_heatmaps: int = 8) -> None:
        super().__init__()
        self.module = module
        self.split, self.perturbation, self.variants = split, perturbation, variants
        self.selection = sorted(selection)
        self.output_dir = Path(output_dir)
        self.settings, self.record, self.num_heatmaps = settings, record, num_heatmaps
        self.run_id = ""
        self._shards_written = 0
        self.summary: dict[str, Any] | None = None

    def on_predict_start(self) -> None:
        self.run_id = self.trainer.strategy.broadcast(f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}")
        self._started = time.perf_counter()

    def predict_step(self, batch, batch_idx: int) -> None:
        images, labels, positions = batch
        hw = tuple(images.shape[-2:])
        indices = [self.split.indices[int(p)] for p in positions]
        notes = [image_annotations(self.split.base, index, hw) for index in indices]
        result = explain_images(self.module.model, images, labels, positions.tolist(), notes, self.perturbation,
                                self.variants, self.settings)
        name = f"{self.run_id}-rank{self.global_rank:03d}-{self._shards_written:06d}.pt"
        store.write_shard(self.output_dir, name, result, positions, indices, labels, self.run_id)
        self._shards_written += 1

    def merge(self) -> dict[str, Any]:
        """Merge the shards of ``output_dir`` into the result files and print the summary table."""
        summary = store.merge_shards(self.output_dir, self.selection, list(self.variants), self.record,
                                     self.run_id, self.settings.seed)
        store.print_summary(summary)
        return summary

    def on_predict_end(self) -> None:
        self.trainer.strategy.barrier()
        if self.trainer.is_global_zero:
            self.summary = self.merge()
            if self.num_heatmaps:
                store.write_heatmaps(self.output_dir, self.split, self.perturbation, list(self.variants),
                                     self.num_heatmaps, getattr(self.module, "model_info", None))
        self.trainer.strategy.barrier()


# ---------------------------------------------------------------------------------------- progress
class ImageProgressBar(TQDMProgressBar):
    """Lightning's progress bar counting explained images (all ranks: rank 0's count × world size)."""

    def __init__(self, total_images: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.total_images = total_images
        self._images = 0

    def init_predict_tqdm(self):
        bar = super().init_predict_tqdm()
        bar.unit = "img"
        bar.bar_format = None
        return bar

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == 0:
            self.predict_progress_bar.reset(total=self.total_images)
            self.predict_progress_bar.set_description("Explaining")
            self._images = 0

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._images = min(self.total_images, self._images + batch[0].shape[0] * trainer.world_size)
        self.predict_progress_bar.n = self._images
        self.predict_progress_bar.refresh()
