"""One metric per perturbation-level bin, and the summaries the ReCalX paper reports.

``PerLevelMetric(KLCalibrationError(), num_bins=10)`` routes each sample to the clone of the metric that
belongs to its level bin ``min(⌊λ·B⌋, B−1)`` and returns every bin's value; :func:`max_over_levels` gives the
paper's CE^max and :func:`relative_reduction` its relative drop between two calibrators.
"""

from __future__ import annotations

import torch
from torch import Tensor


def max_over_levels(values: Tensor) -> Tensor:
    """CE^max: the largest per-level value (B,) → 0-dim, ignoring NaN bins (NaN when all are NaN)."""
    if values.ndim != 1 or values.numel() == 0:
        raise ValueError(f"`values` must be a non-empty (B,) tensor of per-level values, got {tuple(values.shape)}.")
    finite = values[~torch.isnan(values)]
    return finite.max() if finite.numel() else values.new_tensor(float("nan"))


def relative_reduction(before: Tensor | float, after: Tensor | float) -> Tensor:
    """(before − after) / before: 0.96 means a 96% lower error; elementwise, NaN where before = 0."""
    before = torch.as_tensor(before, dtype=torch.float64)
    after = torch.as_tensor(after, dtype=torch.float64).to(before.device)
    return torch.where(before != 0, (before - after) / before, torch.full_like(before, float("nan")))
