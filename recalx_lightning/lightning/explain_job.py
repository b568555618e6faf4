"""Explaining a whole split through Lightning's predict loop: streamed, resumable, the same on any world size.

:class:`ExplanationJob` is the LightningModule that ``python -m recalx_lightning explain`` hands to
``trainer.predict``. Each batch of images is explained under every requested ``<calibrator>/<mode>`` from one
pass of model evaluations (:func:`~recalx_lightning.explain.explain_variants`), each image with its own seed
(seed, image index), and written at once to a shard file of its rank (``<output_dir>/shards``, atomically:
a temporary file renamed into place). Memory therefore does not grow with the number of images, and a run
that is killed loses at most its unfinished batches: rerunning the same command skips the images already in
a shard. Under DDP Lightning splits the images with its (unrepeated) distributed sampler; the merge keeps one
copy per image index, so no image is duplicated or dropped whatever the padding. At the end rank 0 merges the
shards, sorted by image index, into

* ``attributions.pt``: ``torch.load(path, weights_only=True)`` gives ``indices`` (n,) (positions in the split),
  ``dataset_indices`` (n,), ``targets`` (n,), ``predictions`` (n,) and one (n, d) float64 tensor per
  ``"<calibrator>/<mode>"``;
* ``explanations.json``: settings, per-image metrics, summary (means, paired differences to uncalibrated with
  95% bootstrap CIs), and ``model_evaluations_this_run``: the explanation pass plus one clean forward (the
  prediction) per image
  explained by this invocation (the deletion curves behind ``deletion_auc`` are not counted);
* ``explanations.md`` (the summary table) and ``explanations_heatmaps.png``.

``settings.json`` records everything a result depends on; resuming into a directory made with other settings
is refused, naming the setting that differs.
"""

from __future__ import annotations

import json
import os
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

SETTINGS_FILE = "settings.json"
SHARD_DIR = "shards"
MIN_CI_IMAGES = 10


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


# ------------------------------------------------------------------------------------------ shards
def _atomic_save(payload: Any, path: Path) -> None:
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    torch.save(payload, temporary)
    os.replace(temporary, path)


def _atomic_text(text: str, path: Path) -> None:
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def shard_paths(directory: Path) -> list[Path]:
    """Finished shard files (temporary files of interrupted writes are not shards)."""
    return sorted((directory / SHARD_DIR).glob("*.pt"))


def done_positions(directory: Path) -> set[int]:
    """Image positions already written to a shard of ``directory``, read one shard at a time."""
    done: set[int] = set()
    for path in shard_paths(directory):
        done.update(torch.load(path, map_location="cpu", weights_only=True)["indices"].tolist())
    return done


def remove_partial_shards(directory: Path) -> None:
    for path in (directory / SHARD_DIR).glob(".*.tmp"):
        path.unlink(missing_ok=True)


def check_settings(directory: Path, settings: dict[str, Any]) -> None:
    """Refuse to resume into ``directory`` if it was made with other settings; else record them there."""
    settings = json.loads(json.dumps(settings, default=str))
    path = directory / SETTINGS_FILE
    if path.exists():
        previous = json.loads(path.read_text())
        differing = [key for key in sorted(set(previous) | set(settings)) if previous.get(key) != settings.get(key)]
        if differing:
            key = differing[0]
            raise ValueError(
                f"--output_dir {str(directory)!r} holds explanations made with other settings: {key} = "
                f"{previous.get(key)!r} there, {settings.get(key)!r} now"
                + (f" (and {len(differing) - 1} more)" if len(differing) > 1 else "")
                + "; use a fresh --output_dir or the same settings to resume."
            )
        return
    _atomic_text(json.dumps(settings, indent=1, sort_keys=True), path)


def check_writable(directory: Path) -> None:
    """Create ``directory`` (and its shard folder) and prove a file can be written there."""
    try:
        (directory / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        probe = directory / SHARD_DIR / f".probe.{uuid.uuid4().hex}.tmp"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise ValueError(f"--output_dir {str(directory)!r} cannot be written ({error.strerror}); "
                         "choose a writable folder.") from None


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
        method, num_samples, perturbations_per_eval, seed: see :func:`~recalx_lightning.explain.explain`.
        settings: what the result depends on (written to the merged JSON).
        num_heatmaps: images drawn in the heatmap figure (0: none).
    """

    def __init__(self, module, split, perturbation, variants, selection: Sequence[int], output_dir: str | Path,
                 method: str, num_samples: int, perturbations_per_eval: int, seed: int, settings: dict[str, Any],
                 num_heatmaps: int = 8) -> None:
        super().__init__()
        self.module = module
        self.split, self.perturbation, self.variants = split, perturbation, variants
        self.selection = sorted(selection)
        self.output_dir = Path(output_dir)
        self.method, self.num_samples, self.ppe, self.seed = method, num_samples, perturbations_per_eval, seed
        self.settings, self.num_heatmaps = settings, num_heatmaps
        self.run_id = ""
        self._shards_written = 0
        self.summary: dict[str, Any] | None = None

    def on_predict_start(self) -> None:
        self.run_id = self.trainer.strategy.broadcast(f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}")
        self._started = time.perf_counter()

    def predict_step(self, batch, batch_idx: int) -> None:
        from recalx_lightning.explain.study import explain_images, image_annotations

        images, labels, positions = batch
        hw = tuple(images.shape[-2:])
        indices = [self.split.indices[int(p)] for p in positions]
        notes = [image_annotations(self.split.base, index, hw) for index in indices]
        result = explain_images(self.module.model, images, labels, positions.tolist(), notes, self.perturbation,
                                self.variants, self.method, self.num_samples, self.ppe, self.seed, self.module.level)
        shard = {
            "indices": positions.cpu().long(),
            "dataset_indices": torch.tensor(indices, dtype=torch.long),
            "targets": labels.cpu().long(),
            "predictions": result["predictions"].long(),
            "evaluations": torch.tensor(result["evaluations"]),
            "run": self.run_id,
        }
        for key, values in result["attributions"].items():
            shard[f"attributions/{key}"] = values
            for metric, scores in result["metrics"][key].items():
                shard[f"metrics/{key}/{metric}"] = scores
        name = f"{self.run_id}-rank{self.global_rank:03d}-{self._shards_written:06d}.pt"
        _atomic_save(shard, self.output_dir / SHARD_DIR / name)
        self._shards_written += 1

    def on_predict_end(self) -> None:
        self.trainer.strategy.barrier()
        if self.trainer.is_global_zero:
            self.summary = merge_shards(self.output_dir, self.selection, list(self.variants), self.settings,
                                        self.run_id, self.seed)
            print_summary(self.summary)
            if self.num_heatmaps:
                self._draw_heatmaps()
        self.trainer.strategy.barrier()

    def _draw_heatmaps(self) -> None:
        from recalx_lightning.explain.study import image_annotations
        from recalx_lightning.plots import readable_heatmaps

        merged = torch.load(self.output_dir / "attributions.pt", map_location="cpu", weights_only=True)
        count = min(self.num_heatmaps, merged["indices"].numel())
        images = torch.stack([self.split[int(p)][0] for p in merged["indices"][:count]])
        hw = tuple(images.shape[-2:])
        regions = [image_annotations(self.split.base, int(i), hw)["region"] for i in merged["dataset_indices"][:count]]
        maps = {key: self.perturbation.to_pixels(merged[key][:count]) for key in self.variants}
        figure = readable_heatmaps(images, maps, merged["targets"][:count], merged["predictions"][:count],
                                   class_names=class_names(self.split.base), regions=regions,
                                   model_info=getattr(self.module, "model_info", None))
        figure.savefig(self.output_dir / "explanations_heatmaps.png", dpi=110)


def class_names(dataset) -> list[str] | None:
    """Class names of a base dataset (``classes`` or an ImageNet class index), or None."""
    names = getattr(dataset, "classes", None)
    if names is None and hasattr(dataset, "class_index"):
        names = getattr(dataset.class_index, "names", None)
    return list(names) if names is not None else None


# ------------------------------------------------------------------------------------------- merge
def merge_shards(directory: Path, selection: Sequence[int], keys: Sequence[str], settings: dict[str, Any],
                 run_id: str, seed: int) -> dict[str, Any]:
    """Merge every shard of ``directory`` into the result files, one copy per selected image, sorted by index.

    Shards are read one at a time into preallocated outputs (peak memory: the outputs plus one shard).
    """
    from recalx_lightning.explain.study import REFERENCE, summarise_metrics

    selection = sorted(selection)
    n = len(selection)
    row_of = {position: row for row, position in enumerate(selection)}
    filled = torch.zeros(n, dtype=torch.bool)
    merged: dict[str, Tensor] = {"indices": torch.tensor(selection, dtype=torch.long)}
    metrics: dict[str, dict[str, Tensor]] = {}
    evaluations_this_run = 0
    for path in shard_paths(directory):
        shard = torch.load(path, map_location="cpu", weights_only=True)
        if shard.get("run") == run_id:
            evaluations_this_run += int(shard["evaluations"])
        rows, sources = [], []
        for source, position in enumerate(shard["indices"].tolist()):
            row = row_of.get(position)
            if row is not None and not filled[row]:
                rows.append(row)
                sources.append(source)
                filled[row] = True
        if not rows:
            continue
        rows_t, sources_t = torch.tensor(rows), torch.tensor(sources)
        for name in ("dataset_indices", "targets", "predictions", *(f"attributions/{k}" for k in keys)):
            values = shard[name]
            out_name = name.removeprefix("attributions/")
            if out_name not in merged:
                merged[out_name] = torch.zeros((n, *values.shape[1:]), dtype=values.dtype)
            merged[out_name][rows_t] = values[sources_t]
        for name, values in shard.items():
            if name.startswith("metrics/"):
                _, calibrator, mode, metric = name.split("/", 3)
                key = f"{calibrator}/{mode}"
                target = metrics.setdefault(key, {}).setdefault(metric, torch.full((n,), float("nan"),
                                                                                     dtype=torch.float64))
                target[rows_t] = values[sources_t].double()
    if not bool(filled.all()):
        missing = [selection[i] for i in torch.nonzero(~filled).flatten()[:5].tolist()]
        raise RuntimeError(f"{int((~filled).sum())} selected images have no shard (e.g. {missing}); rerun to resume.")
    summary = {key: summarise_metrics(values, metrics.get(REFERENCE), seed) for key, values in metrics.items()}
    torch.save(merged, directory / "attributions.pt.tmp")
    os.replace(directory / "attributions.pt.tmp", directory / "attributions.pt")
    payload = {
        "settings": settings,
        "num_images": n,
        "indices": selection,
        "model_evaluations_this_run": evaluations_this_run,
        "summary": summary,
        "metrics": {key: {m: v.tolist() for m, v in values.items()} for key, values in metrics.items()},
    }
    _atomic_text(json.dumps(payload, indent=1, allow_nan=True), directory / "explanations.json")
    _atomic_text(summary_markdown(summary, n, settings), directory / "explanations.md")
    return payload


def summary_markdown(summary: dict[str, dict[str, dict]], num_images: int, settings: dict[str, Any]) -> str:
    """The end table: metric means per variant and paired differences to uncalibrated with 95% CIs."""
    from recalx_lightning.explain.study import REFERENCE

    metrics = sorted({m for values in summary.values() for m in values})
    lines = [f"# Explanations: {settings.get('method')} on {num_images} images", "",
             f"Paired differences to `{REFERENCE}` with 95% bootstrap CIs over images (CIs need ≥ {MIN_CI_IMAGES}).",
             "", "| variant | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for key, values in summary.items():
        cells = []
        for metric in metrics:
            entry = values.get(metric)
            if entry is None:
                cells.append("–")
                continue
            cell = f"{entry['mean']:.4f}"
            if "diff" in entry and key != REFERENCE:
                interval = (f"[{entry['low']:+.4f}, {entry['high']:+.4f}]" if entry.get("low") is not None
                            else f"(n = {entry['num_pairs']} < {MIN_CI_IMAGES}: no CI)")
                cell += f" (Δ {entry['diff']:+.4f} {interval})"
            cells.append(cell)
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def print_summary(payload: dict[str, Any]) -> None:
    print(summary_markdown(payload["summary"], payload["num_images"], payload["settings"]))
    print(f"model evaluations this run: {payload['model_evaluations_this_run']}")


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
