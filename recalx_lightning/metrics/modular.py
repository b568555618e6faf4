"""The torchmetrics ``Metric`` classes (list or sum states, DDP-exact), loaded on first use.

Each class accumulates what its functional counterpart needs and calls it in ``compute``:
``KLCalibrationError`` → :func:`~recalx_lightning.metrics.kl_calibration_error`, ``NegativeLogLikelihood``,
``BrierScore``, ``TopLabelCalibrationError`` → the functions of :mod:`recalx_lightning.metrics.classification`,
``PerLevelMetric`` routes samples to one clone per perturbation-level bin. Kept apart so that the functional
metrics (and the whole core) import without torchmetrics.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from recalx_lightning._checks import check_levels, check_positive_int
from recalx_lightning.metrics._inputs import InputType, check_input_type, check_preds_target, log_probabilities
from recalx_lightning.metrics.classification import (
    Norm,
    ReliabilityBins,
    _brier_terms,
    _check_norm,
    _ece_from_bins,
    _nll_terms,
    reliability_bins,
)
from recalx_lightning.metrics.kl_calibration import (
    BandwidthRule,
    Variant,
    check_kl_calibration_options,
    kl_calibration_error,
)
from recalx_lightning.perturbation import level_to_bin


class _MeanOverSamples(Metric):
    """Mean of a per-sample score, with float64 sum states (exact under DDP, constant memory)."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    min_samples = 1
    empty_update_safe = True

    def __init__(self, input_type: InputType = "logits", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        check_input_type(input_type)
        self.input_type = input_type
        self.add_state("total", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def _terms(self, log_probs: Tensor, target: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add a batch: preds (n, K) logits or probabilities, target (n,) labels; n = 0 is allowed."""
        check_preds_target(preds, target, self.input_type)
        terms = self._terms(log_probabilities(preds, self.input_type), target.to(preds.device).long())
        self.total += terms.sum()
        self.count += terms.numel()

    def compute(self) -> Tensor:
        """The mean over every sample seen (NaN before any sample)."""
        return self.total / self.count


class NegativeLogLikelihood(_MeanOverSamples):
    """Accumulating :func:`negative_log_likelihood` (lower is better)."""

    def _terms(self, log_probs: Tensor, target: Tensor) -> Tensor:
        return _nll_terms(log_probs, target)


class BrierScore(_MeanOverSamples):
    """Accumulating :func:`brier_score` (lower is better)."""

    def _terms(self, log_probs: Tensor, target: Tensor) -> Tensor:
        return _brier_terms(log_probs, target)


class TopLabelCalibrationError(Metric):
    """Accumulating :func:`top_label_calibration_error`; states are the (B,) reliability sums.

    After :meth:`compute`, :meth:`reliability` returns per-bin (count, mean confidence, accuracy) for a
    reliability diagram.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    min_samples = 1
    empty_update_safe = True

    def __init__(
        self, num_bins: int = 15, norm: Norm = "l1", input_type: InputType = "logits", **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        check_positive_int(num_bins, "num_bins")
        _check_norm(norm)
        check_input_type(input_type)
        self.num_bins, self.norm, self.input_type = num_bins, norm, input_type
        for name in ReliabilityBins._fields:
            self.add_state(name, default=torch.zeros(num_bins, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add a batch: preds (n, K) logits or probabilities, target (n,) labels; n = 0 is allowed."""
        check_preds_target(preds, target, self.input_type)
        stats = reliability_bins(
            log_probabilities(preds, self.input_type), target.to(preds.device).long(), self.num_bins
        )
        for name, value in zip(ReliabilityBins._fields, stats):
            getattr(self, name).add_(value)

    def compute(self) -> Tensor:
        """ECE (``l1``) or MCE (``max``) over every sample seen, 0-dim float64."""
        return _ece_from_bins(ReliabilityBins(self.count, self.confidence_sum, self.correct_sum), self.norm)

    def reliability(self) -> tuple[Tensor, Tensor, Tensor]:
        """(count, mean confidence, accuracy) per confidence bin, each (B,); NaN in empty bins."""
        return self.count, self.confidence_sum / self.count, self.correct_sum / self.count


class KLCalibrationError(Metric):
    """Accumulating :func:`kl_calibration_error` for Lightning loops, exact under DDP.

    The estimate is not a sum over samples, so predictions and labels are kept in list states
    (``dist_reduce_fx="cat"``) and every rank computes the same value from all gathered samples. Memory:
    n · K values of ``preds``' dtype. Empty updates are accepted, so a rank that saw no samples of a subset
    still takes part in the gather. After :meth:`compute`, ``bandwidth_`` holds the bandwidth used.

    Args:
        input_type, bandwidth, bandwidth_grid, block_size, variant, bandwidth_rule: as in
            :func:`kl_calibration_error`.
        kwargs: :class:`torchmetrics.Metric` options (``sync_on_compute``, ``process_group``, ...).
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    min_samples = 2
    empty_update_safe = True

    def __init__(
        self,
        input_type: InputType = "logits",
        bandwidth: float | None = None,
        bandwidth_grid: Sequence[float] | None = None,
        block_size: int | None = None,
        variant: Variant = "canonical",
        bandwidth_rule: BandwidthRule = "likelihood",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_kl_calibration_options(input_type, bandwidth, bandwidth_grid, block_size, variant, bandwidth_rule)
        self.input_type = input_type
        self.bandwidth = bandwidth
        self.bandwidth_grid = None if bandwidth_grid is None else tuple(float(b) for b in bandwidth_grid)
        self.block_size = block_size
        self.variant, self.bandwidth_rule = variant, bandwidth_rule
        self.bandwidth_: float | None = None
        self.add_state("preds", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Store a batch: preds (n, K) logits or probabilities, target (n,) labels; n = 0 is allowed."""
        check_preds_target(preds, target, self.input_type, min_classes=1 if self.variant == "top_label" else 2)
        if self.preds and preds.shape[1] != self.preds[0].shape[1]:
            raise ValueError(
                f"`preds` has {preds.shape[1]} classes but earlier batches had {self.preds[0].shape[1]}; "
                "call reset() between tasks."
            )
        self.preds.append(preds.detach())
        self.target.append(target.detach().long())

    def compute(self) -> Tensor:
        """The KL calibration error of all stored samples (0-dim float64 tensor)."""
        result = kl_calibration_error(
            dim_zero_cat(self.preds),
            dim_zero_cat(self.target),
            self.input_type,
            self.bandwidth,
            self.bandwidth_grid,
            self.block_size,
            self.variant,
            self.bandwidth_rule,
        )
        self.bandwidth_ = result.bandwidth
        return result.value


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
