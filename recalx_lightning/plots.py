"""Heatmaps of explanations overlaid on their images (matplotlib is imported only when a figure is drawn).

Figures are :class:`matplotlib.figure.Figure` objects, not pyplot figures: no backend is selected and nothing is
kept alive by pyplot, so long runs that draw many figures do not leak them. Save with ``figure.savefig(...)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


def heatmap_figure(result: dict[str, Any], max_images: int = 6, **kwargs):
    """Rows: images; columns: the input, then each explanation overlaid on it (see :func:`readable_heatmaps`)."""
    return readable_heatmaps(result["images"], result["maps"], result["labels"], max_images=max_images, **kwargs)


def display_image(image: Tensor, model_info=None) -> Tensor:
    """(H, W) or (H, W, 3) values in [0, 1] of one model input (C, H, W), in raw pixel space when known."""
    image = image.detach().double().cpu()
    mean, std = getattr(model_info, "mean", None), getattr(model_info, "std", None)
    if mean is not None and std is not None and len(mean) == image.shape[0]:
        image = image * torch.tensor(std, dtype=torch.float64)[:, None, None] + torch.tensor(mean)[:, None, None]
        image = image.clamp(0, 1)
    else:
        low, high = image.min(), image.max()
        image = (image - low) / (high - low) if high > low else torch.zeros_like(image)
    return image[0] if image.shape[0] == 1 else image.permute(1, 2, 0)


def readable_heatmaps(
    images: Tensor,
    maps: dict[str, Tensor],
    targets: Tensor,
    predictions: Tensor | None = None,
    class_names: Sequence[str] | None = None,
    regions: Sequence[Tensor | None] | None = None,
    model_info=None,
    max_images: int | None = None,
    row_labels: Sequence[str] | None = None,
):
    """Explanations overlaid on their images, one diverging colour scale centred at 0 per image.

    Args:
        images: (n, C, H, W) model inputs (shown in raw pixel space when ``model_info`` has mean/std; 1 or 3
            channels), or (n, F) tabular rows (maps then shown as a strip).
        maps: ``{variant: (n, H, W) or (n, C, H, W)}`` per-pixel attributions (channels are summed).
        targets, predictions: (n,) explained and predicted classes (titles; names from ``class_names``).
        regions: per image an (H, W) bool object mask or None; its bounding box is drawn on every panel.
        max_images: rows drawn (default: all).
        row_labels: a label per image, written beside its row (e.g. the model and method that explained it).

    The colour scale of a row is shared by all its variants (red: evidence for the class, blue: against) and
    shown by the row's colour bar, so the variants of an image can be compared by eye.
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    keys = list(maps)
    n = images.shape[0] if max_images is None else min(max_images, images.shape[0])
    if n < 1:
        raise ValueError("`readable_heatmaps` needs at least one image.")

    def name(k: int) -> str:
        return class_names[k] if class_names is not None and 0 <= k < len(class_names) else str(k)

    figure = Figure(figsize=(2.4 * (len(keys) + 1) + 0.6, 2.4 * n))
    axes = figure.subplots(n, len(keys) + 1, squeeze=False)
    for row in range(n):
        tabular = images.ndim == 2
        shown = None if tabular else display_image(images[row], model_info)
        target = int(targets[row])
        title = f"label: {name(target)}"
        if predictions is not None and int(predictions[row]) != target:
            title += f"\n(predicted {name(int(predictions[row]))})"
        heats = []
        for key in keys:
            heat = maps[key][row].detach().double().cpu()
            heats.append(heat.sum(0) if heat.ndim == 3 else heat.reshape(1, -1) if heat.ndim == 1 else heat)
        limit = max(float(h.abs().max()) for h in heats) or 1.0
        if shown is not None:
            axes[row, 0].imshow(shown.numpy(), cmap="gray" if shown.ndim == 2 else None, vmin=0, vmax=1)
        else:  # a tabular row: its feature values as a strip, like the attributions beside it
            axes[row, 0].imshow(images[row].detach().double().cpu().reshape(1, -1).numpy(), cmap="gray",
                                aspect="auto")
        axes[row, 0].set_title(title, fontsize=8)
        if row_labels is not None:
            axes[row, 0].set_ylabel(row_labels[row], fontsize=8)
        gray = None if shown is None else (shown if shown.ndim == 2 else shown.mean(-1))
        mappable = None
        for column, (key, heat) in enumerate(zip(keys, heats, strict=True), start=1):
            axis = axes[row, column]
            if gray is not None:
                axis.imshow(gray.numpy(), cmap="gray", vmin=0, vmax=1)
            # opaque where the attribution is large, transparent where it is 0: the image stays visible
            alpha = (heat.abs() / limit).sqrt().clamp(0.15, 0.9).numpy() if gray is not None else None
            mappable = axis.imshow(heat.numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit, alpha=alpha,
                                   interpolation="nearest", aspect="auto" if tabular else None)
            if row == 0:
                axis.set_title(key, fontsize=8)
        region = regions[row] if regions is not None else None
        if region is not None and bool(region.any()):
            ys, xs = torch.nonzero(region.cpu(), as_tuple=True)
            x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
            for axis in axes[row]:
                axis.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="lime",
                                         linewidth=1.2))
        bar = figure.colorbar(mappable, ax=list(axes[row, 1:]), fraction=0.025, pad=0.01)
        bar.ax.tick_params(labelsize=6)
    for axis in axes.flat:
        axis.set_xticks([])
        axis.set_yticks([])
    return figure
