"""Pixel boxes to boolean masks: the one conversion the datasets, the quality metrics and the explain study share."""

from __future__ import annotations

import torch
from torch import Tensor


def boxes_to_masks(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Boolean masks (n, H, W) of boxes (n, 4) ``(x_min, y_min, x_max, y_max)``, half-open, clipped."""
    boxes = torch.as_tensor(boxes)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"`boxes` must have shape (n, 4) as (x_min, y_min, x_max, y_max), got {tuple(boxes.shape)}.")
    h, w = size
    rows = torch.arange(h, device=boxes.device)[None, :, None]
    cols = torch.arange(w, device=boxes.device)[None, None, :]
    x0, y0, x1, y1 = (boxes[:, i, None, None] for i in range(4))
    return (cols >= x0) & (cols < x1) & (rows >= y0) & (rows < y1)
