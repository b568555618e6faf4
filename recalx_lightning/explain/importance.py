"""Global feature importance: SAGE-style predictive power under a perturbation, and its decomposition.

The predictive power of a coalition S under perturbation π (features outside S replaced by the baseline),
with cross-entropy ℓ and the (recalibrated) model f_S(x) = softmax(f(x_S) / T(λ(S))), is

    v(S) = E[ℓ(f_∅(X), Y)] − E[ℓ(f_S(X), Y)]

and splits (for a constant f_∅ = q) into baseline bias + information − calibration error:

    v(S) = KL(P_Y ‖ q) + I(f_S(X); Y) − CE_KL(f_S),      CE_KL(f_S) = E[KL(P(Y | f_S(X)) ‖ f_S(X))]

SAGE values (Covert et al. 2020) are the Shapley values of v: φ_j = E_π[v(S_π^{<j} ∪ j) − v(S_π^{<j})],
estimated by permutation sampling with every permutation scored on the whole data set; they sum to
v(N) = E[ℓ(f_∅)] − E[ℓ(f)]. A level-dependent temperature changes v only through the calibration term, so
ReCalX's effect on global importance is read off :func:`decompose_predictive_power`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from recalx_lightning._checks import check_labels, check_positive_int
from recalx_lightning.calibrators import TemperatureCalibrator, apply_temperature
from recalx_lightning.explain.consistent import size_temperatures
from recalx_lightning.perturbation import Perturbation


class GlobalImportance(NamedTuple):
    """SAGE values (d,), their standard errors over permutations (d,), and v(N) = Σ values."""

    values: Tensor
    std_errors: Tensor
    total: float


class PredictivePower(NamedTuple):
    """v(S) and its split: ``value = baseline_bias + information − calibration_error`` (nats)."""

    value: float
    baseline_bias: float
    information: float
    calibration_error: float


def _losses(model, inputs, labels, perturbation, keep: Tensor, temperatures: Tensor, batch_size: int) -> Tensor:
    """Mean cross-entropy over the data for each keep row (r, d) → (r,) float64."""
    n = inputs.shape[0]
    sizes = keep.sum(1)
    out = torch.zeros(keep.shape[0], dtype=torch.float64)
    with torch.no_grad():
        for r in range(keep.shape[0]):
            total = 0.0
            row = keep[r : r + 1]
            for start in range(0, n, batch_size):
                x = inputs[start : start + batch_size]
                logits = model(perturbation.apply(x, row.expand(x.shape[0], -1))).double()
                scaled = apply_temperature(logits, temperatures[sizes[r]])
                total += float(F.cross_entropy(scaled, labels[start : start + batch_size].to(logits.device),
                                               reduction="sum"))
            out[r] = total / n
    return out


def global_importance(
    model,
    inputs: Tensor,
    labels: Tensor,
    perturbation: Perturbation,
    calibrator: TemperatureCalibrator | None = None,
    num_permutations: int = 32,
    batch_size: int = 1024,
    seed: int = 0,
) -> GlobalImportance:
    """SAGE values of the perturbation's d features by permutation sampling.

    Args:
        model: logits (m, K) of a batch; inputs: (n, *S) data; labels: (n,) classes.
        calibrator: temperatures applied at each coalition's exact level (``None``: uncalibrated).
        num_permutations: P permutations, each scored at all d + 1 coalitions on all n samples
            (the empty and full coalitions once): (P·(d − 1) + 2)·n model evaluations.
        batch_size: samples per model call. seed: seeds the permutations (CPU generator).
    Returns:
        :class:`GlobalImportance` (values sum to v(N) exactly).
    """
    check_positive_int(num_permutations, "num_permutations")
    check_positive_int(batch_size, "batch_size")
    perturbation.check_input(inputs)
    d, n = perturbation.num_features, inputs.shape[0]
    if n == 0:
        raise ValueError("`inputs` is empty: global importance needs data.")
    temperatures = size_temperatures(calibrator, d)
    generator = torch.Generator().manual_seed(int(seed))
    perms = torch.stack([torch.randperm(d, generator=generator) for _ in range(num_permutations)])
    ends = _losses(model, inputs, labels, perturbation, torch.tensor([[False] * d, [True] * d]), temperatures,
                   batch_size)
    ranks = perms.argsort(1)
    sizes = torch.arange(1, d)
    keep = (ranks[:, None, :] < sizes[None, :, None]).reshape(-1, d)  # (P·(d−1), d)
    inner = _losses(model, inputs, labels, perturbation, keep, temperatures, batch_size).view(num_permutations, d - 1)
    losses = torch.cat([ends[0].expand(num_permutations, 1), inner, ends[1].expand(num_permutations, 1)], 1)
    gains = losses[:, :-1] - losses[:, 1:]  # (P, d): loss drop when feature perms[p, k] joins
    per_perm = torch.zeros(num_permutations, d, dtype=torch.float64).scatter_(1, perms, gains)
    std = per_perm.std(0) / num_permutations**0.5 if num_permutations > 1 else torch.full((d,), float("nan"))
    return GlobalImportance(per_perm.mean(0), std, float(ends[0] - ends[1]))


def decompose_predictive_power(
    scaled_logits: Tensor, empty_logits: Tensor, labels: Tensor, **kl_kwargs
) -> PredictivePower:
    """Split v(S) into baseline bias + information − calibration error.

    Args:
        scaled_logits: (n, K) logits of f_S (perturbed inputs, temperature already applied).
        empty_logits: (n, K) or (1, K) logits of f_∅ (all features replaced, temperature applied).
        labels: (n,) classes.
        kl_kwargs: passed to :func:`recalx_lightning.metrics.kl_calibration_error` (bandwidth, ...).

    Estimation: v(S) and the bias are plug-in means over the sample — bias = E[ℓ(f_∅)] − H(P̂_Y), which
    is KL(P̂_Y ‖ q) for a constant f_∅ = q; CE_KL(f_S) is the Dirichlet-kernel estimate; the information
    term is implied by the identity, I = v − bias + CE_KL (so it carries the CE estimator's error).
    """
    from recalx_lightning.metrics import kl_calibration_error

    n, num_classes = scaled_logits.shape
    check_labels(labels, num_classes, n)
    if empty_logits.ndim != 2 or empty_logits.shape[1] != num_classes or empty_logits.shape[0] not in (1, n):
        raise ValueError(f"`empty_logits` must have shape (1, {num_classes}) or ({n}, {num_classes}).")
    empty_logits = empty_logits.double().expand(n, -1)
    loss_empty = F.cross_entropy(empty_logits, labels, reduction="mean")
    loss_subset = F.cross_entropy(scaled_logits.double(), labels, reduction="mean")
    prior = torch.bincount(labels, minlength=num_classes).double() / n
    entropy = -(prior[prior > 0] * prior[prior > 0].log()).sum()
    value = float(loss_empty - loss_subset)
    bias = float(loss_empty - entropy)
    calibration = float(kl_calibration_error(scaled_logits.double(), labels, **kl_kwargs).value)
    return PredictivePower(value, bias, value - bias + calibration, calibration)


def recovery_auroc(importance: Tensor, informative: Tensor) -> float:
    """AUROC of importance scores (d,) for recovering the truly informative features (d,) bool.

    Mann–Whitney form: P(score of an informative feature > score of an uninformative one), ties count ½.
    """
    informative = informative.bool().flatten()
    scores = importance.double().flatten()
    if scores.shape != informative.shape:
        raise ValueError(f"`importance` {tuple(scores.shape)} and `informative` {tuple(informative.shape)} differ.")
    pos, neg = scores[informative], scores[~informative]
    if pos.numel() == 0 or neg.numel() == 0:
        raise ValueError("`informative` must mark at least one informative and one uninformative feature.")
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())
