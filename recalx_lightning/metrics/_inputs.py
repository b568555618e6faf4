"""Validation and normalisation of classifier outputs shared by every metric in this package.

Metrics work on float64 log-probabilities ``log p`` (n, K): from logits by ``log_softmax`` (exact, finite
even where ``softmax`` underflows to 0), from probabilities by clamping to :data:`PROB_EPS` and
renormalising (a probability of exactly 0 would make ``log p`` and the KL divergence infinite).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from recalx_lightning._checks import check_finite, check_labels, check_logits

InputType = Literal["logits", "probs"]
INPUT_TYPES = ("logits", "probs")
#: Floor for probability inputs: a class with probability 0 then costs at most log(1e12) ≈ 27.6 nats per unit
#: of mass that the calibration map puts on it. Pass logits to avoid the floor altogether.
PROB_EPS = 1e-12
_SUM_TOL = 1e-3


def check_input_type(input_type: str) -> None:
    """Require ``input_type`` to be ``"logits"`` or ``"probs"``."""
    if input_type not in INPUT_TYPES:
        raise ValueError(
            f"`input_type` must be 'logits' (pre-softmax scores, preferred) or 'probs' (rows on the simplex), "
            f"got {input_type!r}."
        )


def check_preds_target(preds: Tensor, target: Tensor, input_type: str, min_classes: int = 2) -> None:
    """Require preds (n, K) finite with K >= ``min_classes`` (rows on the simplex for ``probs``) and labels (n,)
    in [0, K). ``min_classes=1`` admits a single class (a top-label error, which is then 0)."""
    check_input_type(input_type)
    if min_classes == 1 and isinstance(preds, Tensor) and preds.ndim == 2 and preds.shape[1] == 1:
        if not preds.is_floating_point():
            raise ValueError(f"`preds` must be floating point, got dtype {preds.dtype}.")
        check_finite(preds, "preds", fix="Check the model's forward pass or drop those samples.")
    elif input_type == "logits":
        check_logits(preds, "preds")
    else:
        if not isinstance(preds, Tensor) or preds.ndim != 2 or preds.shape[1] < 2:
            shape = tuple(preds.shape) if isinstance(preds, Tensor) else type(preds).__name__
            raise ValueError(f"`preds` must be a tensor of shape (n, K) with K >= 2 classes, got {shape}.")
        if not preds.is_floating_point():
            raise ValueError(f"`preds` must be floating point, got dtype {preds.dtype}.")
        if not torch.isfinite(preds).all():
            raise ValueError("`preds` contains NaN or ±inf; check the model's outputs or drop those samples.")
        if preds.numel():
            if preds.min() < 0 or preds.max() > 1:
                raise ValueError(
                    f"`preds` with input_type='probs' must lie in [0, 1], got values in "
                    f"[{float(preds.min())}, {float(preds.max())}]. Pass input_type='logits' for raw scores."
                )
            worst = float((preds.double().sum(1) - 1).abs().max())
            if worst > _SUM_TOL:
                raise ValueError(
                    f"`preds` with input_type='probs' must have rows summing to 1 (tolerance {_SUM_TOL}); the "
                    f"worst row is off by {worst:.3g}. Apply softmax, or pass input_type='logits'."
                )
    if not isinstance(target, Tensor):
        raise ValueError(f"`target` must be a tensor of class indices, got {type(target).__name__}.")
    check_labels(target, preds.shape[1], preds.shape[0], name="target")


def log_probabilities(preds: Tensor, input_type: str) -> Tensor:
    """Float64 log-probabilities (n, K) from logits or probabilities (see the module docstring)."""
    preds = preds.detach().double()
    if input_type == "logits":
        return torch.log_softmax(preds, dim=1)
    log_p = preds.clamp_min(PROB_EPS).log()
    return log_p - torch.logsumexp(log_p, dim=1, keepdim=True)
