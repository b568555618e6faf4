"""One metric per perturbation-level bin, and the summaries the ReCalX paper reports.

``PerLevelMetric(KLCalibrationError(), num_bins=10)`` routes each sample to the clone of the metric that
belongs to its level bin ``min(⌊λ·B⌋, B−1)`` and returns every bin's value; :func:`max_over_levels` gives the
paper's CE^max and :func:`relative_reduction` its relative drop between two calibrators.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from recalx_lightning._checks import check_levels, check_positive_int
from recalx_lightning.perturbation import level_to_bin


class PerLevelMetric(Metric):
    """Keep one copy of ``metric`` per level bin; ``compute()`` returns the (B,) per-bin values.

    Args:
        metric: a template :class:`torchmetrics.Metric` with ``update(preds, target)`` and a scalar
            ``compute()``; it is cloned B times (its own state is never used).
        num_bins: B equal-width bins over λ ∈ [0, 1], as in :func:`~recalx_lightning.perturbation.level_to_bin`.

    A bin holding fewer than ``metric.min_samples`` samples (default 1) over all processes reports NaN
    instead of raising. Under DDP, metrics marked ``empty_update_safe`` (those of this package) are also
    updated with empty batches so that every rank takes part in every bin's gather; others (torchmetrics'
    own) are updated only with non-empty batches.

    ``forward`` only accumulates (it returns None): use ``update`` / ``compute``.
    """

    full_state_update = False

    def __init__(self, metric: Metric, num_bins: int = 10, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(metric, Metric):
            raise ValueError(f"`metric` must be a torchmetrics.Metric instance, got {type(metric).__name__}.")
        check_positive_int(num_bins, "num_bins")
        self.num_bins = num_bins
        self.min_samples = int(getattr(metric, "min_samples", 1))
        self._update_empty = bool(getattr(metric, "empty_update_safe", False))
        self.metrics = nn.ModuleList(metric.clone() for _ in range(num_bins))
        self.add_state("counts", default=torch.zeros(num_bins, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor, levels: Tensor) -> None:
        """Route a batch: preds (n, ...), target (n,), levels (n,) perturbation levels λ in [0, 1]."""
        if preds.ndim == 0 or target.ndim == 0 or preds.shape[0] != target.shape[0]:
            raise ValueError(
                f"`preds` and `target` need the same number of samples on dim 0, got {tuple(preds.shape)} and "
                f"{tuple(target.shape)}."
            )
        check_levels(levels, preds.shape[0])
        bins = level_to_bin(levels, self.num_bins).to(preds.device)
        self.counts += torch.bincount(bins, minlength=self.num_bins).to(self.counts.device)
        for index, metric in enumerate(self.metrics):
            mask = bins == index
            if self._update_empty or bool(mask.any()):
                metric.update(preds[mask], target[mask])

    def forward(self, *args: Any, **kwargs: Any) -> None:
        """Accumulate like :meth:`update`; per-batch values per level are not meaningful for most metrics."""
        self.update(*args, **kwargs)

    def compute(self) -> Tensor:
        """Per-bin values (B,) float64; NaN for bins with fewer than ``min_samples`` samples."""
        values = torch.full((self.num_bins,), float("nan"), dtype=torch.float64, device=self.counts.device)
        for index, metric in enumerate(self.metrics):
            if int(self.counts[index]) >= self.min_samples:
                values[index] = metric.compute().to(values)
        return values

    def reset(self) -> None:
        """Reset the counts and every per-bin metric."""
        super().reset()
        for metric in self.metrics:
            metric.reset()


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
