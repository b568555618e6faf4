"""Quality of explanations, batched in torch. Each metric returns one value per explained input, (n,).

Maps are attributions spread onto pixels, (n, H, W) (e.g. :attr:`Explanation.maps`); regions are boolean
masks (n, H, W) or boxes (n, 4) ``(x_min, y_min, x_max, y_max)`` in pixels, half-open
(``[x_min, x_max) × [y_min, y_max)``; see :func:`boxes_to_masks`). Write a⁺ = max(a, 0).

============================  =================================================================================
metric                        formula
============================  =================================================================================
:func:`localization`          Σ_{p ∈ R} a⁺_p / Σ_p a⁺_p (ReCalX's energy-based pointing); NaN without positive
                              attribution, 0 for an empty region
:func:`pointing_game`         share of the maximal pixels argmax_p a_p that lie in R (1/0 without ties; ties
                              split the hit instead of rewarding flat maps)
:func:`alignment`             Spearman ρ between the map and a reference map, with average ranks for ties, for
                              three conventions reported apart: signed a, absolute |a|, positive part a⁺; NaN
                              when either map is constant
:func:`deletion_curve`        s_k = p_E(y | x with the k top-ranked features replaced), k = 0..d
:func:`insertion_curve`       s_k = p_E(y | baseline with the k top-ranked features restored); both scored by one
                              fixed evaluator model E for every calibrator; AUC = trapezoid over k/d ∈ [0, 1]
:func:`max_sensitivity`       max_m ‖φ(x + ε_m) − φ(x)‖₂ (/ ‖φ(x)‖₂ if normalised), ε_m ~ U[−r, r] seeded
:func:`paired_bootstrap_ci`   mean of a − b over pairs and its percentile bootstrap interval
============================  =================================================================================
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from recalx_lightning._boxes import boxes_to_masks
from recalx_lightning._checks import check_positive_int
from recalx_lightning.perturbation import Perturbation

Convention = Literal["signed", "absolute", "positive"]
CONVENTIONS = ("signed", "absolute", "positive")


# -------------------------------------------------------------------------------------------- regions
def _region(maps: Tensor, region: Tensor) -> Tensor:
    if maps.ndim < 2:
        raise ValueError(f"`maps` must have shape (n, ...) per-pixel attributions, got {tuple(maps.shape)}.")
    if region.dtype != torch.bool and region.ndim == 2 and region.shape[1] == 4 and maps.ndim == 3:
        return boxes_to_masks(region.to(maps.device), tuple(maps.shape[1:]))
    if region.shape != maps.shape:
        raise ValueError(
            f"`region` must be a boolean mask of the maps' shape {tuple(maps.shape)} or boxes (n, 4) for (n, H, W) "
            f"maps, got {tuple(region.shape)} ({region.dtype})."
        )
    return region.to(device=maps.device, dtype=torch.bool)


# ------------------------------------------------------------------------------------------- metrics
def localization(maps: Tensor, region: Tensor) -> Tensor:
    """Share of positive attribution inside the region, Σ_{R} a⁺ / Σ a⁺, shape (n,) float64.

    NaN for a map without positive attribution (the share is undefined; average with ``nanmean``).
    """
    inside = _region(maps, region)
    positive = maps.double().clamp_min(0).flatten(1)
    total = positive.sum(1)
    share = (positive * inside.flatten(1)).sum(1) / total
    return torch.where(total > 0, share, torch.full_like(share, float("nan")))


def pointing_game(maps: Tensor, region: Tensor) -> Tensor:
    """Hit rate of the maximum: share of the pixels attaining max a that lie in the region, (n,) float64."""
    inside = _region(maps, region).flatten(1)
    flat = maps.double().flatten(1)
    is_max = flat == flat.max(1, keepdim=True).values
    return (is_max & inside).sum(1).double() / is_max.sum(1).double()


def average_ranks(values: Tensor) -> Tensor:
    """Ranks 1..m along the last dim, ties sharing their average rank, shape of ``values``, float64."""
    flat = values.double().reshape(-1, values.shape[-1])
    ordered = flat.sort(1).values
    below = torch.searchsorted(ordered, flat, right=False)
    at_most = torch.searchsorted(ordered, flat, right=True)
    return ((below + at_most + 1).double() / 2).view(values.shape)


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman ρ of each row pair (n, ...) vs (n, ...) → (n,) float64: Pearson correlation of average ranks."""
    if a.shape != b.shape:
        raise ValueError(f"maps to correlate must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}.")
    ra, rb = average_ranks(a.flatten(1)), average_ranks(b.flatten(1))
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    denom = (ra.square().sum(1) * rb.square().sum(1)).sqrt()
    rho = (ra * rb).sum(1) / denom
    return torch.where(denom > 0, rho, torch.full_like(rho, float("nan")))


def alignment(maps: Tensor, reference: Tensor, conventions: tuple[str, ...] = CONVENTIONS) -> dict[str, Tensor]:
    """Spearman ρ with a reference map (e.g. human saliency): ``{convention: (n,)}`` per convention.

    signed: a as is; absolute: |a| (importance regardless of direction); positive: a⁺ (evidence *for* the
    class only, the usual convention for saliency maps). They answer different questions: report them apart.
    """
    bad = [c for c in conventions if c not in CONVENTIONS]
    if bad:
        raise ValueError(f"unknown conventions {bad}; choose from {CONVENTIONS}.")
    transforms = {"signed": lambda a: a, "absolute": torch.abs, "positive": lambda a: a.clamp_min(0)}
    reference = reference.to(maps.device)
    return {c: spearman(transforms[c](maps.double()), reference) for c in conventions}


# ------------------------------------------------------------------------------------------ faithfulness
class Curve(NamedTuple):
    """Scores (n, num_steps + 1) at the fractions (num_steps + 1,) of features moved, and their AUC (n,)."""

    scores: Tensor
    fractions: Tensor
    auc: Tensor


def _curve(
    evaluator: Callable[[Tensor], Tensor],
    inputs: Tensor,
    attributions: Tensor,
    perturbation: Perturbation,
    target: Tensor,
    num_steps: int | None,
    batch_size: int,
    insertion: bool,
) -> Curve:
    d = perturbation.num_features
    n = inputs.shape[0]
    if attributions.shape != (n, d):
        raise ValueError(f"`attributions` must have shape ({n}, {d}) (per feature), got {tuple(attributions.shape)}.")
    if target.shape != (n,):
        raise ValueError(f"`target` must have shape ({n},), got {tuple(target.shape)}.")
    num_steps = d if num_steps is None else num_steps
    check_positive_int(num_steps, "num_steps")
    check_positive_int(batch_size, "batch_size")
    perturbation.check_input(inputs)
    counts = torch.round(torch.linspace(0, d, min(num_steps, d) + 1, dtype=torch.float64)).long()
    # rank of each feature in decreasing attribution order (stable: ties by feature index)
    order = torch.sort(-attributions.double().cpu(), dim=1, stable=True).indices
    ranks = order.argsort(1)
    base = perturbation.baseline(inputs)
    scores = torch.empty(n, counts.numel(), dtype=torch.float64)
    steps_per_batch = max(1, batch_size // n)
    with torch.no_grad():
        for start in range(0, counts.numel(), steps_per_batch):
            k = counts[start : start + steps_per_batch]
            moved = ranks[None] < k[:, None, None]  # (s, n, d)
            keep = moved if insertion else ~moved
            s = k.numel()
            tile = (s, *([1] * (inputs.ndim - 1)))
            x = inputs.repeat(tile)
            elements = perturbation.element_keep(keep.reshape(s * n, d).to(x.device), x.ndim - 1)
            perturbed = torch.where(elements, x, base.repeat(tile))
            probs = evaluator(perturbed).double().softmax(-1)
            picked = probs.gather(1, target.repeat(s)[:, None].to(probs.device)).view(s, n)
            scores[:, start : start + s] = picked.T.cpu()
    fractions = counts.double() / d
    return Curve(scores, fractions, torch.trapezoid(scores, fractions, dim=1))


def deletion_curve(
    evaluator: Callable[[Tensor], Tensor],
    inputs: Tensor,
    attributions: Tensor,
    perturbation: Perturbation,
    target: Tensor,
    num_steps: int | None = None,
    batch_size: int = 256,
) -> Curve:
    """Evaluator probability of ``target`` as the most-attributed features are replaced by the baseline.

    Args:
        evaluator: one fixed model (logits) scoring every calibrator's explanation, so that they are
            compared on the same footing (usually the uncalibrated model).
        inputs: (n, *S); attributions: (n, d) per-feature values; target: (n,).
        num_steps: points on the curve besides k = 0 (default d: one feature at a time); feature counts
            k_i = round(i·d/num_steps).
        batch_size: perturbed inputs per evaluator call.
    Lower AUC = more faithful (removing what the explanation ranks first destroys the prediction fast).
    """
    return _curve(evaluator, inputs, attributions, perturbation, target, num_steps, batch_size, insertion=False)


def insertion_curve(
    evaluator: Callable[[Tensor], Tensor],
    inputs: Tensor,
    attributions: Tensor,
    perturbation: Perturbation,
    target: Tensor,
    num_steps: int | None = None,
    batch_size: int = 256,
) -> Curve:
    """Like :func:`deletion_curve`, starting from the all-baseline input and restoring the top features first.

    Higher AUC = more faithful.
    """
    return _curve(evaluator, inputs, attributions, perturbation, target, num_steps, batch_size, insertion=True)


# --------------------------------------------------------------------------------------------- robustness
def max_sensitivity(
    explain_fn: Callable[[Tensor], Tensor],
    inputs: Tensor,
    radius: float = 0.02,
    num_samples: int = 8,
    seed: int = 0,
    normalize: bool = False,
) -> Tensor:
    """max_m ‖φ(x + ε_m) − φ(x)‖₂ over m = 1..num_samples, ε_m ~ U[−radius, radius] per element, (n,) float64.

    Args:
        explain_fn: maps inputs (n, *S) to attributions (n, ...), e.g.
            ``lambda x: explain(model, x, perturbation, calibrator, target).attributions`` (fix the target and
            the explainer's seed, so that only the input changes).
        normalize: divide by ‖φ(x)‖₂ (relative change).
    The noise is drawn from a CPU generator seeded by ``seed``: identical on every device.
    """
    if not radius > 0:
        raise ValueError(f"`radius` must be > 0, got {radius}.")
    check_positive_int(num_samples, "num_samples")
    generator = torch.Generator().manual_seed(int(seed))
    reference = explain_fn(inputs).double().flatten(1)
    worst = torch.zeros(inputs.shape[0], dtype=torch.float64, device=reference.device)
    for _ in range(num_samples):
        noise = (torch.rand(inputs.shape, generator=generator, dtype=torch.float64) * 2 - 1) * radius
        moved = explain_fn(inputs + noise.to(device=inputs.device, dtype=inputs.dtype)).double().flatten(1)
        worst = torch.maximum(worst, (moved - reference).norm(dim=1))
    if normalize:
        worst = worst / reference.norm(dim=1)
    return worst


# ------------------------------------------------------------------------------------------------ stats
class BootstrapResult(NamedTuple):
    """Mean paired difference a − b, its ``confidence`` percentile interval [low, high], and pairs used."""

    mean_difference: float
    low: float
    high: float
    num_pairs: int


def paired_bootstrap_ci(
    a: Tensor, b: Tensor, num_resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> BootstrapResult:
    """Percentile bootstrap CI of mean(a − b) over paired samples (pairs with a NaN are dropped).

    Resamples pairs with replacement ``num_resamples`` times from a CPU generator seeded by ``seed``.
    """
    a, b = torch.as_tensor(a).double().flatten().cpu(), torch.as_tensor(b).double().flatten().cpu()
    if a.shape != b.shape:
        raise ValueError(f"`a` and `b` must be paired (same length), got {a.numel()} and {b.numel()}.")
    if not 0 < confidence < 1:
        raise ValueError(f"`confidence` must be in (0, 1), got {confidence}.")
    check_positive_int(num_resamples, "num_resamples")
    diff = a - b
    diff = diff[~torch.isnan(diff)]
    if diff.numel() == 0:
        raise ValueError("no pair without NaN: `a` and `b` hold no comparable values.")
    generator = torch.Generator().manual_seed(int(seed))
    # resamples drawn in blocks of rows (the same stream as one draw): memory stays bounded for many pairs
    rows = max(1, 2**22 // diff.numel())
    means = torch.cat([
        diff[torch.randint(diff.numel(), (min(rows, num_resamples - start), diff.numel()), generator=generator)].mean(1)
        for start in range(0, num_resamples, rows)
    ])
    alpha = (1 - confidence) / 2
    low, high = torch.quantile(means, torch.tensor([alpha, 1 - alpha], dtype=torch.float64)).tolist()
    return BootstrapResult(float(diff.mean()), low, high, int(diff.numel()))
