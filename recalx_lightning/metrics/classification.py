"""Companions of the KL calibration error: top-label ECE, negative log-likelihood and Brier score.

Each is a functional plus a :class:`torchmetrics.Metric` with *sum* states (O(1) or O(bins) memory, exact
under DDP). Accuracy is torchmetrics' own ``MulticlassAccuracy(num_classes=K, average="micro")``.

Not torchmetrics' ``MulticlassCalibrationError``: it bins with ``bucketize(..., right=True)`` over B + 1
edges, so a confidence of exactly 1.0 lands in an extra (B+1)-th bin instead of the last one, it decides
logits-vs-probabilities from the values (logits that happen to lie in [0, 1] are taken as probabilities), it
applies softmax in the input precision, and it stores every confidence. torchmetrics has no multiclass NLL
or Brier score.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

from recalx_lightning._checks import check_positive_int
from recalx_lightning.metrics._inputs import (
    InputType,
    check_preds_target,
    log_probabilities,
)

Norm = Literal["l1", "max"]


class ReliabilityBins(NamedTuple):
    """Per confidence bin b (each (B,) float64): sample count, Σ confidence, Σ correct (top-label)."""

    count: Tensor
    confidence_sum: Tensor
    correct_sum: Tensor


def confidence_bin(confidence: Tensor, num_bins: int) -> Tensor:
    """Bin ``min(⌊c·B⌋, B−1)`` of each confidence c in [0, 1]: bins [b/B, (b+1)/B), with 1.0 in the last."""
    return torch.floor(confidence.double() * num_bins).long().clamp_(0, num_bins - 1)


def reliability_bins(log_probs: Tensor, target: Tensor, num_bins: int = 15) -> ReliabilityBins:
    """Sufficient statistics of the top-label reliability diagram from float64 log-probabilities (n, K)."""
    top_log_prob, predicted = log_probs.max(dim=1)
    confidence = top_log_prob.exp()
    bins = confidence_bin(confidence, num_bins)
    zeros = torch.zeros(num_bins, dtype=torch.float64, device=log_probs.device)
    return ReliabilityBins(
        zeros.index_add(0, bins, torch.ones_like(confidence)),
        zeros.index_add(0, bins, confidence),
        zeros.index_add(0, bins, (predicted == target).double()),
    )


def _ece_from_bins(stats: ReliabilityBins, norm: Norm) -> Tensor:
    filled = stats.count > 0
    gap = (stats.correct_sum[filled] - stats.confidence_sum[filled]).abs() / stats.count[filled]
    if norm == "max":
        return gap.max() if gap.numel() else stats.count.new_tensor(float("nan"))
    return (gap * stats.count[filled]).sum() / stats.count.sum()


def _check_norm(norm: str) -> None:
    if norm not in ("l1", "max"):
        raise ValueError(f"`norm` must be 'l1' (ECE) or 'max' (MCE), got {norm!r}.")


def _check_nonempty(n: int) -> None:
    if n == 0:
        raise ValueError("the metric needs at least 1 sample, got n = 0.")


def top_label_calibration_error(
    preds: Tensor, target: Tensor, input_type: InputType = "logits", num_bins: int = 15, norm: Norm = "l1"
) -> Tensor:
    """Top-label expected (``norm="l1"``) or maximum (``"max"``) calibration error with equal-width bins.

    ECE = Σ_b (n_b / n) · |acc_b − conf_b| over the non-empty bins [b/B, (b+1)/B) of the top-label confidence,
    the last bin closed at 1.0. preds (n, K) logits or probabilities, target (n,) → 0-dim float64.
    """
    check_preds_target(preds, target, input_type)
    check_positive_int(num_bins, "num_bins")
    _check_norm(norm)
    _check_nonempty(preds.shape[0])
    stats = reliability_bins(log_probabilities(preds, input_type), target.to(preds.device).long(), num_bins)
    return _ece_from_bins(stats, norm)


def _nll_terms(log_probs: Tensor, target: Tensor) -> Tensor:
    return -log_probs.gather(1, target[:, None]).squeeze(1)


def _brier_terms(log_probs: Tensor, target: Tensor) -> Tensor:
    probs = log_probs.exp()
    on_target = probs.gather(1, target[:, None]).squeeze(1)
    return probs.square().sum(1) - 2 * on_target + 1


def negative_log_likelihood(preds: Tensor, target: Tensor, input_type: InputType = "logits") -> Tensor:
    """Mean −log p_y (nats), preds (n, K), target (n,) → 0-dim float64. Probabilities are floored at 1e-12."""
    check_preds_target(preds, target, input_type)
    _check_nonempty(preds.shape[0])
    return _nll_terms(log_probabilities(preds, input_type), target.to(preds.device).long()).mean()


def brier_score(preds: Tensor, target: Tensor, input_type: InputType = "logits") -> Tensor:
    """Mean multiclass Brier score Σ_k (p_k − [y = k])², in [0, 2]; preds (n, K), target (n,) → 0-dim float64."""
    check_preds_target(preds, target, input_type)
    _check_nonempty(preds.shape[0])
    return _brier_terms(log_probabilities(preds, input_type), target.to(preds.device).long()).mean()
