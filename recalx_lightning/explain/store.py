"""The files of an explanation run, without Lightning: settings, shards, the merged result and its summary.

A run directory holds

* ``settings.json``: everything the result depends on (:func:`settings_record`); resuming into a directory made
  with other settings is refused, naming the setting that differs (:func:`check_settings`);
* ``shards/*.pt``: the explained images, one file per batch and rank (:func:`write_shard`), each written
  atomically (a temporary file renamed into place), so an interrupted run loses at most its unfinished
  batches and a rerun skips the images already in a shard (:func:`done_positions`);
* after :func:`merge_shards`, sorted by position and one copy per image whatever the padding of the ranks:
  ``attributions.pt`` (``torch.load(path, weights_only=True)`` gives ``indices`` (n,) (positions in the split),
  ``dataset_indices`` (n,), ``targets`` (n,), ``predictions`` (n,) and one (n, d) float64 tensor per
  ``"<calibrator>/<mode>"``), ``explanations.json`` (settings, per-image metrics, summary, and
  ``model_evaluations_this_run``) and ``explanations.md`` (the summary table); :func:`write_heatmaps` draws
  ``explanations_heatmaps.png``.

:class:`~recalx_lightning.lightning.explain_job.ExplanationJob` writes these from Lightning's predict loop.
"""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from recalx_lightning.explain.study import REFERENCE, ExplainSettings, image_annotations, summarise_metrics

SETTINGS_FILE = "settings.json"
SHARD_DIR = "shards"
MIN_CI_IMAGES = 10


def atomic_save(payload: Any, path: Path) -> None:
    """``torch.save`` to a temporary file renamed into place: ``path`` is either absent or complete."""
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    torch.save(payload, temporary)
    os.replace(temporary, path)


def atomic_text(text: str, path: Path) -> None:
    """Write ``text`` to a temporary file renamed into place."""
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def check_writable(path: str | os.PathLike, option: str) -> None:
    """Raise naming ``option`` when ``path`` (or the nearest existing folder above it) cannot be written.

    Creates nothing: a run that fails on another option afterwards leaves no folder behind.
    """
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        parent = os.path.dirname(existing)
        if parent == existing:
            break
        existing = parent
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"`{option}` {str(path)!r} is not writable ({existing!r}); pass a writable folder with "
                         f"--{option}.")


# ---------------------------------------------------------------------------------------- settings
def settings_record(settings: ExplainSettings, variants: Sequence[str], **context: Any) -> dict[str, Any]:
    """What a result depends on, as ``settings.json`` records it: the fields of ``settings`` (its calibrators
    and modes as the ``variants`` they expand to) and ``context`` (split, model, data, temperatures, ...)."""
    record = dataclasses.asdict(settings)
    del record["calibrators"], record["modes"]
    return {**record, "variants": list(variants), **context}


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
    atomic_text(json.dumps(settings, indent=1, sort_keys=True), path)


def prepare_directory(directory: Path, settings: dict[str, Any]) -> set[int]:
    """Make ``directory`` ready to (re)start a run with ``settings``: check it can be written, create it,
    refuse other settings, drop the temporary files of interrupted writes. Returns the positions already
    explained there."""
    check_writable(directory, "output_dir")
    (directory / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    check_settings(directory, settings)
    for path in (directory / SHARD_DIR).glob(".*.tmp"):
        path.unlink(missing_ok=True)
    return done_positions(directory)


# ------------------------------------------------------------------------------------------ shards
def shard_paths(directory: Path) -> list[Path]:
    """Finished shard files (temporary files of interrupted writes are not shards)."""
    return sorted((directory / SHARD_DIR).glob("*.pt"))


def done_positions(directory: Path) -> set[int]:
    """Image positions already written to a shard of ``directory``, read one shard at a time."""
    done: set[int] = set()
    for path in shard_paths(directory):
        done.update(torch.load(path, map_location="cpu", weights_only=True)["indices"].tolist())
    return done


def write_shard(directory: Path, name: str, result: dict[str, Any], positions: Tensor, dataset_indices: Sequence[int],
                targets: Tensor, run_id: str) -> None:
    """Write the explanations of one batch (``result`` of :func:`~recalx_lightning.explain.study.explain_images`
    for the images at ``positions``) to ``<directory>/shards/<name>``, atomically."""
    shard = {
        "indices": positions.cpu().long(),
        "dataset_indices": torch.tensor(dataset_indices, dtype=torch.long),
        "targets": targets.cpu().long(),
        "predictions": result["predictions"].long(),
        "evaluations": torch.tensor(result["evaluations"]),
        "run": run_id,
    }
    for key, values in result["attributions"].items():
        shard[f"attributions/{key}"] = values
        for metric, scores in result["metrics"][key].items():
            shard[f"metrics/{key}/{metric}"] = scores
    atomic_save(shard, directory / SHARD_DIR / name)


# ------------------------------------------------------------------------------------------- merge
def merge_shards(directory: Path, selection: Sequence[int], keys: Sequence[str], settings: dict[str, Any],
                 run_id: str, seed: int) -> dict[str, Any]:
    """Merge every shard of ``directory`` into the result files, one copy per selected image, sorted by index.

    Shards are read one at a time into preallocated outputs (peak memory: the outputs plus one shard).
    """
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
    atomic_text(json.dumps(payload, indent=1, allow_nan=True), directory / "explanations.json")
    atomic_text(summary_markdown(summary, n, settings), directory / "explanations.md")
    return payload


def summary_markdown(summary: dict[str, dict[str, dict]], num_images: int, settings: dict[str, Any]) -> str:
    """The end table: metric means per variant and paired differences to uncalibrated with 95% CIs."""
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
    """Print the summary table of a merged result and its model evaluations."""
    print(summary_markdown(payload["summary"], payload["num_images"], payload["settings"]))
    print(f"model evaluations this run: {payload['model_evaluations_this_run']}")


# ---------------------------------------------------------------------------------------- heatmaps
def class_names(dataset) -> list[str] | None:
    """Class names of a base dataset (``classes`` or an ImageNet class index), or None."""
    names = getattr(dataset, "classes", None)
    if names is None and hasattr(dataset, "class_index"):
        names = getattr(dataset.class_index, "names", None)
    return list(names) if names is not None else None


def write_heatmaps(directory: Path, split, perturbation, keys: Sequence[str], num_images: int,
                   model_info=None) -> None:
    """Draw the first ``num_images`` images of the merged result in ``directory`` with their maps under
    every variant in ``keys`` (boxes and class names where ``split``'s base dataset has them)."""
    from recalx_lightning.plots import readable_heatmaps

    merged = torch.load(directory / "attributions.pt", map_location="cpu", weights_only=True)
    count = min(num_images, merged["indices"].numel())
    images = torch.stack([split[int(p)][0] for p in merged["indices"][:count]])
    hw = tuple(images.shape[-2:])
    regions = [image_annotations(split.base, int(i), hw)["region"] for i in merged["dataset_indices"][:count]]
    maps = {key: perturbation.to_pixels(merged[key][:count]) for key in keys}
    figure = readable_heatmaps(images, maps, merged["targets"][:count], merged["predictions"][:count],
                               class_names=class_names(split.base), regions=regions, model_info=model_info)
    figure.savefig(directory / "explanations_heatmaps.png", dpi=110)
