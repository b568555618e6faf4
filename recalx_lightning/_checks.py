"""Input validation shared by every public entry point.

Each check raises a ``ValueError`` naming the parameter and the fix *before* any work starts.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor


def check_logits(logits: Tensor, name: str = "logits") -> None:
    """Require a finite (n, K) tensor with K >= 2; warn when it looks like probabilities."""
    if not isinstance(logits, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor of shape (n, K), got {type(logits).__name__}.")
    if logits.ndim != 2:
        raise ValueError(f"`{name}` must have shape (n, K) (samples × classes), got {tuple(logits.shape)}.")
    if logits.shape[1] < 2:
        raise ValueError(f"`{name}` needs at least 2 classes (K >= 2), got K = {logits.shape[1]}.")
    if not logits.is_floating_point():
        raise ValueError(f"`{name}` must be floating point, got dtype {logits.dtype}.")
    check_finite(logits, name, fix="Check the model's forward pass or drop those samples.")
    if looks_like_probabilities(logits):
        warnings.warn(
            f"`{name}` looks like probabilities (entries in [0, 1], rows sum to 1); temperatures are "
            "fitted on logits. Pass the model's pre-softmax outputs (or log-probabilities).",
            UserWarning,
            stacklevel=3,
        )


def looks_like_probabilities(values: Tensor) -> bool:
    """Entries in [0, 1] and rows summing to 1 (a softmax output, not logits)."""
    if not values.numel() or values.min() < 0 or values.max() > 1:
        return False
    row_sums = values.sum(1)
    return bool(torch.allclose(row_sums, torch.ones_like(row_sums), atol=1e-4))


def check_model_logits(outputs: Tensor, name: str = "model outputs") -> None:
    """Require a model's outputs to be finite (n, K) logits, refusing probabilities (temperatures act on logits)."""
    if not isinstance(outputs, Tensor) or outputs.ndim != 2 or outputs.shape[1] < 2:
        shape = tuple(outputs.shape) if isinstance(outputs, Tensor) else type(outputs).__name__
        raise ValueError(f"{name} must be logits of shape (n, K) with K >= 2, got {shape}.")
    check_finite(outputs, name, fix="Check the model's forward pass.")
    if looks_like_probabilities(outputs.float()):
        raise ValueError(
            f"{name} look like probabilities (entries in [0, 1], rows sum to 1); temperatures and softmax act on "
            "logits. Drop the model's final softmax (or return log-probabilities)."
        )


def check_finite(tensor: Tensor, name: str, fix: str = "Remove or repair those entries.") -> None:
    """Raise naming how many entries of ``tensor`` are NaN or ±inf, in how many rows, and the first positions."""
    if not tensor.is_floating_point():
        return
    bad = ~torch.isfinite(tensor)
    if bad.any():
        where = bad.nonzero()[:5].tolist()
        rows = int(bad.flatten(1).any(1).sum()) if tensor.ndim > 1 else int(bad.sum())
        raise ValueError(
            f"`{name}` contains {int(bad.sum())} non-finite values (NaN or ±inf) in {rows} rows; first "
            f"positions: {where}. {fix}"
        )


def check_labels(labels: Tensor, num_classes: int, n: int, name: str = "labels") -> None:
    """Require integer labels of length ``n`` inside [0, num_classes)."""
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(f"`{name}` must have shape ({n},) to match the logits, got {tuple(labels.shape)}.")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"`{name}` must hold integer class indices, got dtype {labels.dtype}.")
    if n and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"`{name}` must lie in [0, {num_classes}) for {num_classes} classes; found values in "
            f"[{int(labels.min())}, {int(labels.max())}]. Does the classifier's class count match the data?"
        )


def check_levels(levels: Tensor, n: int | None = None, name: str = "levels") -> None:
    """Require perturbation levels λ in [0, 1] (shape (n,) when ``n`` is given)."""
    if levels.ndim != 1 or (n is not None and levels.shape[0] != n):
        expected = f"({n},)" if n is not None else "(n,)"
        raise ValueError(f"`{name}` must have shape {expected}, got {tuple(levels.shape)}.")
    if levels.numel() and (
        not torch.isfinite(levels).all() or levels.min() < 0 or levels.max() > 1
    ):
        raise ValueError(
            f"`{name}` are perturbation levels λ = share of replaced features and must lie in [0, 1]; "
            f"got values in [{float(levels.min())}, {float(levels.max())}]."
        )


def check_positive_int(value: int, name: str, minimum: int = 1) -> None:
    """Require an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")


def check_keep(keep: Tensor, num_features: int, name: str = "keep") -> None:
    """Require a 0/1 matrix of shape (n, num_features)."""
    if not isinstance(keep, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor of shape (n, {num_features}).")
    if keep.ndim != 2 or keep.shape[1] != num_features:
        raise ValueError(
            f"`{name}` must have shape (n, {num_features}) (one 0/1 entry per feature), "
            f"got {tuple(keep.shape)}."
        )
    if keep.dtype != torch.bool and keep.numel() and not ((keep == 0) | (keep == 1)).all():
        raise ValueError(f"`{name}` must contain only 0 (replaced) and 1 (kept) entries.")
