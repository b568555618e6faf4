r"""KL calibration error by leave-one-out kernel regression (Popordanoska et al., AISTATS 2024), three variants.

For predictions p_i = f(x_i) on the simplex and labels y_i, the calibration error induced by the log loss is

.. math::  \mathrm{CE}_{KL}(f) = \mathbb{E}\big[\mathrm{KL}\big(\mathbb{E}[Y \mid f(X)] \,\|\, f(X)\big)\big].

``variant="canonical"`` estimates the calibration map E[Y | f(X) = p_i] by a leave-one-out Nadaraya–Watson
vote of the other samples' one-hot labels e_{y_j}, weighted by the Dirichlet kernel centred on p_j and
evaluated at p_i:

.. math::
    \hat c_i = \frac{\sum_{j\ne i} k_b(p_i, p_j)\, e_{y_j}}{\sum_{j\ne i} k_b(p_i, p_j)}, \qquad
    k_b(p_i, p_j) = \mathrm{Dir}(p_i;\ \alpha_j = p_j / b + 1),

    \log k_b(p_i, p_j) = \log\Gamma(1/b + K) - \sum_k \log\Gamma(p_{jk}/b + 1)
                         + \tfrac{1}{b} \sum_k p_{jk} \log p_{ik},

and :math:`\widehat{\mathrm{CE}}_{KL} = \frac1n \sum_i \mathrm{KL}(\hat c_i \| p_i)` with 0·log 0 = 0. Its
plug-in bias grows with K (the vote regresses a K-way label): on predictions calibrated by construction it
reads ≈ 0.2–0.5 nats at K = 10 and several nats at K = 1,000 (``benchmarks/study_kl_estimator_error.py``).

``variant="top_label"`` is the same construction in one dimension: the confidence c_i = max_k p_ik against the
correctness z_i = 1[argmax_k p_ik = y_i], with the Beta kernel Beta(c_i; c_j/b + 1, (1 − c_j)/b + 1) and the
binary KL(ĉ_i ‖ c_i). ``variant="classwise"`` averages over classes k the binary error of (p_ik, 1[y_i = k])
with the same Beta kernel (Popordanoska et al.'s classwise estimator). Both regress a binary label, so their
bias does not grow with K.

Bandwidth b, unless given (``bandwidth_rule``):

- ``"likelihood"`` (the paper's rule): the b that maximises the leave-one-out log-likelihood of the kernel
  density estimate of the predictions themselves, :math:`\sum_i \log \frac{1}{n-1} \sum_{j\ne i} k_b(p_i, p_j)`
  (Dirichlet kernel on p for ``canonical``, Beta kernel on the confidences c for ``top_label``). It ignores the
  labels. No ``-log b`` term is added, as in the published code: the kernels are normalised densities.
- ``"label_loss"``: the b that minimises the leave-one-out log loss of the label estimate,
  :math:`-\sum_i \log \hat c_i[y_i]` (cross-validated likelihood of the regression itself); samples whose own
  label gets an estimate of exactly 0 (a class seen once) are counted first, see :func:`_best_label_loss`.

``classwise`` uses one bandwidth for every class: the one the rule selects for the ``top_label`` problem of
the same predictions (a per-class search would cost K times the grid; ``benchmarks/study_kl_estimator_error.py``
measures the result). The grid is :data:`DEFAULT_BANDWIDTHS`, that of the published code:
logspace(−5, −1, 50) followed by linspace(0.2, 1, 5).

Cost (canonical): the cross term :math:`G = \log P\, P^\top` is one (n × n) matmul per sweep, shared by every
bandwidth (scaled by 1/b); labels enter by an ``index_add`` of the kernel weights, O(n²) rather than O(n²K); the
KL is closed-form. Bandwidth selection first screens the whole grid in float32 with a rigorous bound on the
rounding error of each likelihood; the bandwidths that can still be the best (usually one) are then scored in
float64 in the same sweep that computes their KL error, so the selected bandwidth and the value are those of
a plain float64 evaluation of the whole grid. Binary variants: the Beta log-kernel is an outer product
(c_j · logit c_i) / b minus a per-column normaliser, O(n²) per class and bandwidth without a matmul, in
float64. Rows are processed in cache-sized blocks of ``block_size`` so that memory is O(block_size · n + nK);
exp() arguments are clamped below (far under one ulp of any row sum) because underflowing exp() is ~50× slower
on CPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from recalx_lightning._checks import check_positive_int
from recalx_lightning.metrics._inputs import (
    InputType,
    check_input_type,
    check_preds_target,
    log_probabilities,
)

#: Bandwidth grid searched when no bandwidth is given, as in the published code: logspace(-5, -1, 50) followed
#: by linspace(0.2, 1, 5) (55 values, computed here in float64).
DEFAULT_BANDWIDTHS: tuple[float, ...] = tuple(
    [10.0 ** (-5 + 4 * i / 49) for i in range(50)] + [0.2, 0.4, 0.6, 0.8, 1.0]
)
Variant = Literal["canonical", "top_label", "classwise"]
VARIANTS: tuple[str, ...] = ("canonical", "top_label", "classwise")
BandwidthRule = Literal["likelihood", "label_loss"]
BANDWIDTH_RULES: tuple[str, ...] = ("likelihood", "label_loss")
#: Entries of one (block_size × n) work matrix when ``block_size`` is not given: 2¹⁷ (1 MB in float64), small
#: enough to stay in a core's L2 cache while every bandwidth is scored on the block.
_BLOCK_ELEMENTS = 2**17
#: exp() is ~50× slower on CPU where its result underflows, so arguments (≤ 0 after the row maximum is
#: subtracted) are clamped to these floors first. n terms of e^-700 ≈ 1e-304 (float64) or e^-80 ≈ 2e-35
#: (float32) are far below one ulp of a row sum whose largest term is 1.
_EXP_FLOOR = {torch.float64: -700.0, torch.float32: -80.0}
_U32 = 2.0**-24  # unit round-off of float32
#: Binary sweeps take the many-class block floor (>= 64 rows): it amortises the per-block overhead (~25% faster).
_BINARY_ROWS_AS_CLASSES = 256
#: The float32 screen is skipped (every grid bandwidth scored in float64) when |log p| / b could exceed this.
_SCREEN_LIMIT = 1e30


class KLCalibrationResult(NamedTuple):
    """``value``: the estimate (0-dim float64 tensor, nats); ``bandwidth``: the kernel bandwidth b used."""

    value: Tensor
    bandwidth: float


def _check_bandwidths(bandwidth: float | None, bandwidth_grid: Sequence[float] | None) -> None:
    if bandwidth is not None:
        if isinstance(bandwidth, bool) or not isinstance(bandwidth, (int, float)):
            raise ValueError(f"`bandwidth` must be a positive float or None, got {bandwidth!r}.")
        if not (math.isfinite(bandwidth) and bandwidth > 0):
            raise ValueError(
                f"`bandwidth` must be a finite float > 0 (or None to select it), got {bandwidth!r}."
            )
    if bandwidth_grid is not None:
        grid = list(bandwidth_grid)
        if not grid or not all(math.isfinite(float(b)) and float(b) > 0 for b in grid):
            raise ValueError(
                f"`bandwidth_grid` must be a non-empty sequence of finite floats > 0, got {bandwidth_grid!r}."
            )


def _block_rows(n: int, block_size: int | None, num_classes: int = 1) -> int:
    if block_size is None:
        # Many classes: the matmul dominates and runs ~3x faster with >= 64 rows than with a dozen.
        floor = 64 if num_classes >= 256 else 1
        return max(1, min(n, max(floor, _BLOCK_ELEMENTS // max(n, 1))))
    check_positive_int(block_size, "block_size")
    return min(block_size, n)


def _normalisers(probs: Tensor, bandwidths: Sequence[float]) -> list[Tensor]:
    """S_j(b) = Σ_k log Γ(p_jk / b + 1) for every sample j and bandwidth b (the kernel's per-column term)."""
    return [torch.lgamma(probs / b + 1).sum(1) for b in bandwidths]


def _shared_term(bandwidth: float, n: int, num_classes: int) -> float:
    """log Γ(1/b + K) − log(n − 1): the per-row constant of the leave-one-out log-likelihood."""
    return math.lgamma(1.0 / bandwidth + num_classes) - math.log(n - 1)


def _kernel_rows(
    cross: Tensor, neg_normaliser: Tensor, inv_bandwidth: float, diagonal: Tensor, out: Tensor
) -> tuple[Tensor, Tensor]:
    """out ← exp(s − max_j s) row-wise, with s_ij = cross_ij / b − S_j; ``cross`` is -inf on the leave-one-out
    diagonal (flat indices ``diagonal``), which is set to exactly 0 after the clamped exp().

    Returns (row maximum, row sum) so that log Σ_{j≠i} exp(s_ij) = max + log(sum).
    """
    torch.add(neg_normaliser, cross, alpha=inv_bandwidth, out=out)
    row_max = out.amax(1, keepdim=True)
    out.sub_(row_max).clamp_min_(_EXP_FLOOR[out.dtype]).exp_()
    out.view(-1).index_fill_(0, diagonal, 0.0)
    return row_max.squeeze(1), out.sum(1)


def _row_blocks(n: int, block_rows: int, device: torch.device):
    """Yield (start, stop, flat indices of the block's leave-one-out diagonal in a (rows × n) matrix)."""
    for start in range(0, n, block_rows):
        stop = min(start + block_rows, n)
        rows = torch.arange(stop - start, device=device)
        yield start, stop, rows * n + rows + start


def _float64_pass(
    log_probs: Tensor,
    probs: Tensor,
    bandwidths: Sequence[float],
    normalisers: Sequence[Tensor],
    block_rows: int,
    target: Tensor | None,
    want_likelihood: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """One float64 sweep over row blocks scoring each bandwidth: returns (LOO log-likelihoods, n · CE_KL,
    LOO log loss of the label estimate as (B, 2) rows [samples whose own label gets ĉ_i[y_i] = 0,
    −Σ_i log ĉ_i[y_i] over the others], see :func:`_best_label_loss`).

    The cross term log P · Pᵀ is computed once per block and shared by every bandwidth. The likelihood is
    computed when ``want_likelihood`` (else zeros), the KL error and the log loss when ``target`` is given
    (else zeros).
    """
    n, num_classes = log_probs.shape
    probs_t = probs.T.contiguous()
    neg = [-s for s in normalisers]
    likelihood = torch.zeros(len(bandwidths), dtype=torch.float64, device=log_probs.device)
    kl_sum = torch.zeros_like(likelihood)
    loss_sum = likelihood.new_zeros(len(bandwidths), 2)
    work = torch.empty(block_rows, n, dtype=torch.float64, device=log_probs.device)
    for start, stop, diagonal in _row_blocks(n, block_rows, log_probs.device):
        cross = (log_probs[start:stop] @ probs_t).view(-1).index_fill_(0, diagonal, -math.inf).view(stop - start, n)
        out = work[: stop - start]
        for index, b in enumerate(bandwidths):
            row_max, row_sum = _kernel_rows(cross, neg[index], 1.0 / b, diagonal, out)
            if want_likelihood:
                likelihood[index] += (row_max + row_sum.log()).sum()
            if target is not None:
                votes = out.new_zeros(stop - start, num_classes).index_add_(1, target, out)
                estimate = votes.div_(row_sum[:, None])
                kl = torch.xlogy(estimate, estimate).sum(1) - (estimate * log_probs[start:stop]).sum(1)
                kl_sum[index] += kl.sum()
                loss_sum[index] += _label_loss_terms(estimate.gather(1, target[start:stop, None]))
    if want_likelihood:
        likelihood += torch.tensor(
            [n * _shared_term(b, n, num_classes) for b in bandwidths], dtype=torch.float64, device=likelihood.device
        )
    return likelihood, kl_sum, loss_sum


def _label_loss_terms(own: Tensor) -> Tensor:
    """[number of zero estimates, −Σ log of the others] for the estimates ``own`` of the samples' own labels."""
    zero = own == 0
    return torch.stack([zero.sum().to(own.dtype), -own.log().masked_fill(zero, 0.0).sum()])


def _best_label_loss(scores: Tensor) -> int:
    """Grid index of the lowest leave-one-out log loss, from (B, 2) rows [zero estimates, finite loss].

    A zero estimate of a sample's own label makes the log loss infinite (e.g. a class seen once: nothing
    else votes for it at any bandwidth); bandwidths are compared by the number of such samples first, then
    by the log loss of the others, so the rule equals the plain argmin whenever some bandwidth is finite.
    First index on ties.
    """
    rows = scores.tolist()
    return min(range(len(rows)), key=lambda i: (rows[i][0], rows[i][1], i))


def _screen(
    log_probs: Tensor, probs: Tensor, bandwidths: Sequence[float], normalisers: Sequence[Tensor], block_rows: int
) -> tuple[Tensor, Tensor] | None:
    """Float32 leave-one-out log-likelihood of every bandwidth with a rigorous bound on its error.

    Returns (lower, upper), float64 tensors bracketing the float64 values of :func:`dirichlet_loo_log_likelihood`,
    or ``None`` where float32 cannot represent the scores (|log p| / b above ``_SCREEN_LIMIT``).

    Error bound, per row i (u = 2⁻²⁴, L_i = max_k |log p_ik| >= |G_ij| since G_ij is a convex combination of
    the log p_ik): the float32 matmul and the score s_ij = G_ij / b − S_j carry an error of at most
    u ((K + 8) L_i / b + 3 max_j |S_j|) (taken twice here); log-sum-exp is 1-Lipschitz in the scores; the
    clamp adds at most n e^-80, exp 4u and the float32 row sum γ_n ≈ n u in relative terms; the final
    additions u |LSE_i| each. The float64 values differ from the exact ones by the same bound with 2⁻⁵³ in
    place of u, hence the factor 1.01.
    """
    n, num_classes = log_probs.shape
    magnitude = log_probs.abs().amax(1)
    largest = float(magnitude.max()) * max(1.0, max(1.0 / b for b in bandwidths))
    if not largest < _SCREEN_LIMIT:
        return None
    lp32 = log_probs.float()
    probs_t32 = probs.T.float().contiguous()
    neg32 = [(-s).float() for s in normalisers]
    maxima = torch.empty(len(bandwidths), n, dtype=torch.float32, device=log_probs.device)
    sums = torch.empty_like(maxima)
    work = torch.empty(block_rows, n, dtype=torch.float32, device=log_probs.device)
    for start, stop, diagonal in _row_blocks(n, block_rows, log_probs.device):
        cross = (lp32[start:stop] @ probs_t32).view(-1).index_fill_(0, diagonal, -math.inf).view(stop - start, n)
        out = work[: stop - start]
        for index, b in enumerate(bandwidths):
            maxima[index, start:stop], sums[index, start:stop] = _kernel_rows(
                cross, neg32[index], 1.0 / b, diagonal, out
            )
    lse = maxima.double() + sums.double().log()
    totals, abs_totals = lse.sum(1), lse.abs().sum(1)
    magnitude_sum = float(magnitude.sum())
    lower, upper = [], []
    for index, b in enumerate(bandwidths):
        shared = n * _shared_term(b, n, num_classes)
        scores = _U32 * (
            (2 * num_classes + 16) * magnitude_sum / b + 6 * n * float(normalisers[index].abs().max())
        )
        summation = n * ((n + 100) * 1.1 * _U32 + n * math.exp(-80.0))
        error = 1.01 * (scores + summation + 2 * _U32 * float(abs_totals[index]) + _U32 * abs(shared)) + 1e-6
        value = float(totals[index]) + shared
        lower.append(value - error)
        upper.append(value + error)
    if not all(math.isfinite(v) for v in lower + upper):
        return None
    return torch.tensor(lower, dtype=torch.float64), torch.tensor(upper, dtype=torch.float64)


def _candidates(
    log_probs: Tensor, probs: Tensor, bandwidths: Sequence[float], normalisers: Sequence[Tensor], block_rows: int
) -> list[int]:
    """Indices of the bandwidths that can have the highest float64 likelihood, by the float32 screen.

    Every bandwidth whose upper bound reaches the best lower bound is kept, so the float64 argmax (first on
    ties) over the returned indices is the float64 argmax over the whole grid.
    """
    bounds = _screen(log_probs, probs, bandwidths, normalisers, block_rows)
    if bounds is None:
        return list(range(len(bandwidths)))
    lower, upper = bounds
    return [int(i) for i in torch.nonzero(upper >= lower.max()).flatten()]


def dirichlet_loo_log_likelihood(
    log_probs: Tensor, bandwidths: Sequence[float], block_size: int | None = None
) -> Tensor:
    """Leave-one-out log-likelihood Σ_i log((n−1)⁻¹ Σ_{j≠i} Dir(p_i; p_j/b + 1)) for each b, shape (len(b),).

    Computed in float64 for every bandwidth (no screening).

    Args:
        log_probs: float64 log-probabilities (n, K), n >= 2 (see :func:`kl_calibration_error`).
        bandwidths: the bandwidths b > 0 to score.
        block_size: rows per block (memory O(block_size · n)); default keeps a block near 1 MB.
    """
    n = log_probs.shape[0]
    if n < 2:
        raise ValueError(f"the leave-one-out likelihood needs at least 2 samples, got {n}.")
    _check_bandwidths(None, bandwidths)
    grid = [float(b) for b in bandwidths]
    probs = log_probs.exp()
    likelihood, _, _ = _float64_pass(
        log_probs, probs, grid, _normalisers(probs, grid), _block_rows(n, block_size, log_probs.shape[1]), None, True
    )
    return likelihood


def _select(
    log_probs: Tensor,
    probs: Tensor,
    grid: Sequence[float],
    block_rows: int,
    target: Tensor | None,
) -> tuple[float, Tensor]:
    """(selected bandwidth, n · CE_KL at it, zero when ``target`` is None): float32 screen of the grid, then
    float64 likelihood (and KL error) of the remaining candidates in one sweep."""
    normalisers = _normalisers(probs, grid)
    keep = _candidates(log_probs, probs, grid, normalisers, block_rows)
    if len(keep) == 1 and target is None:
        return grid[keep[0]], torch.zeros((), dtype=torch.float64)
    likelihood, kl_sum, _ = _float64_pass(
        log_probs,
        probs,
        [grid[i] for i in keep],
        [normalisers[i] for i in keep],
        block_rows,
        target,
        want_likelihood=len(keep) > 1,
    )
    best = int(torch.argmax(likelihood)) if len(keep) > 1 else 0
    return grid[keep[best]], kl_sum[best]


def select_bandwidth(
    log_probs: Tensor, bandwidth_grid: Sequence[float] | None = None, block_size: int | None = None
) -> float:
    """The bandwidth of ``bandwidth_grid`` (default :data:`DEFAULT_BANDWIDTHS`) with the highest float64
    leave-one-out log-likelihood (first one on ties), as :func:`dirichlet_loo_log_likelihood` scores it.

    The grid is screened in float32 with a rigorous error bound; only bandwidths that can still be the best
    are scored in float64, so the choice is that of the full float64 evaluation.
    """
    _check_bandwidths(None, bandwidth_grid)
    n = log_probs.shape[0]
    if n < 2:
        raise ValueError(f"the leave-one-out likelihood needs at least 2 samples, got {n}.")
    grid = [float(b) for b in (DEFAULT_BANDWIDTHS if bandwidth_grid is None else bandwidth_grid)]
    return _select(log_probs, log_probs.exp(), grid, _block_rows(n, block_size, log_probs.shape[1]), None)[0]


# ------------------------------------------------------------------------------- binary (Beta) variants
def _log_beta_function(success: Tensor, failure: Tensor, bandwidth: float) -> Tensor:
    """log B(c/b + 1, (1 − c)/b + 1) per sample, from c = ``success`` and 1 − c = ``failure`` (both given so
    that 1 − c keeps its precision near c = 1)."""
    shared = math.lgamma(1 / bandwidth + 2)
    return torch.lgamma(success / bandwidth + 1) + torch.lgamma(failure / bandwidth + 1) - shared


def _beta_pass(
    log_c: Tensor,
    log_1mc: Tensor,
    outcome: Tensor,
    bandwidths: Sequence[float],
    block_rows: int,
    want_likelihood: bool,
    want_value: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """One float64 sweep of a binary problem over row blocks, for each bandwidth: (LOO log-likelihood of the
    Beta kernel density of c, n · binary CE_KL, LOO log loss of the label estimate).

    ``log_c``, ``log_1mc``: (n,) log c_i and log(1 − c_i) (finite); ``outcome``: (n,) 0/1 labels z_i. The
    log-kernel log Beta(c_i; c_j/b + 1, (1 − c_j)/b + 1) equals log(1 − c_i)/b (constant in the row) plus
    c_j (log c_i − log(1 − c_i))/b − log B_j, an outer product; the row constant cancels in the estimate
    ĉ_i = Σ_{j≠i} k_ij z_j / Σ_{j≠i} k_ij and is added back to the likelihood.
    """
    n = log_c.shape[0]
    success, failure = log_c.exp(), log_1mc.exp()
    logit = log_c - log_1mc
    votes = torch.stack([outcome, 1 - outcome], 1).to(torch.float64)  # (n, 2): Σ k z and Σ k (1 − z) at once
    likelihood = torch.zeros(len(bandwidths), dtype=torch.float64, device=log_c.device)
    kl_sum, loss_sum = torch.zeros_like(likelihood), likelihood.new_zeros(len(bandwidths), 2)
    neg_norm = [-_log_beta_function(success, failure, b) for b in bandwidths]
    scaled = [success / b for b in bandwidths]
    work = torch.empty(block_rows, n, dtype=torch.float64, device=log_c.device)
    floor = _EXP_FLOOR[torch.float64]
    for start, stop, diagonal in _row_blocks(n, block_rows, log_c.device):
        out = work[: stop - start]
        rows = slice(start, stop)
        for index, b in enumerate(bandwidths):
            torch.addcmul(neg_norm[index], logit[rows, None], scaled[index], out=out)
            out.view(-1).index_fill_(0, diagonal, -math.inf)
            row_max = out.amax(1, keepdim=True)
            out.sub_(row_max).clamp_min_(floor).exp_()
            out.view(-1).index_fill_(0, diagonal, 0.0)
            weights = out @ votes  # (rows, 2)
            row_sum = weights.sum(1)
            if want_likelihood:
                likelihood[index] += (row_max.squeeze(1) + row_sum.log() + log_1mc[rows] / b).sum()
            if want_value:
                hit, miss = weights[:, 0] / row_sum, weights[:, 1] / row_sum
                kl = torch.xlogy(hit, hit) - hit * log_c[rows] + torch.xlogy(miss, miss) - miss * log_1mc[rows]
                kl_sum[index] += kl.sum()
                loss_sum[index] += _label_loss_terms(torch.where(outcome[rows].bool(), hit, miss))
    if want_likelihood:
        likelihood -= n * math.log(n - 1)
    return likelihood, kl_sum, loss_sum


def _top_label_problem(log_probs: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(log c, log(1 − c), z) of the top label: c = max_k p_k, 1 − c = Σ_{k ≠ argmax} p_k (exact in log space)."""
    log_c, top = log_probs.max(1)
    others = log_probs.scatter(1, top[:, None], -math.inf)
    return log_c, torch.logsumexp(others, 1), (top == target).to(torch.float64)


def _class_problem(log_probs: Tensor, target: Tensor, k: int, log_1m_top: Tensor, top: Tensor):
    """(log p_k, log(1 − p_k), 1[y = k]); 1 − p_k from the other classes' mass where k is the argmax."""
    log_c = log_probs[:, k]
    log_1mc = torch.where(top == k, log_1m_top, torch.log(-torch.expm1(log_c)))
    return log_c, log_1mc, (target == k).to(torch.float64)


def beta_loo_log_likelihood(
    log_c: Tensor, log_1mc: Tensor, bandwidths: Sequence[float], block_size: int | None = None
) -> Tensor:
    """Leave-one-out log-likelihood Σ_i log((n−1)⁻¹ Σ_{j≠i} Beta(c_i; c_j/b + 1, (1 − c_j)/b + 1)) for each b.

    Args:
        log_c, log_1mc: (n,) float64 log c and log(1 − c), n >= 2.
        bandwidths: the bandwidths b > 0 to score.
        block_size: rows per block (memory O(block_size · n)).
    """
    n = log_c.shape[0]
    if n < 2:
        raise ValueError(f"the leave-one-out likelihood needs at least 2 samples, got {n}.")
    _check_bandwidths(None, bandwidths)
    grid = [float(b) for b in bandwidths]
    outcome = torch.zeros_like(log_c)
    return _beta_pass(log_c, log_1mc, outcome, grid, _block_rows(n, block_size), True, False)[0]


def _select_beta(
    log_c: Tensor, log_1mc: Tensor, outcome: Tensor, grid: Sequence[float], rule: str, block_rows: int
) -> tuple[float, Tensor]:
    """(selected bandwidth, n · binary CE_KL at it) for one binary problem, by ``rule`` over ``grid``."""
    if rule == "likelihood":
        likelihood, _, _ = _beta_pass(log_c, log_1mc, outcome, grid, block_rows, True, False)
        best = grid[int(torch.argmax(likelihood))]
        return best, _beta_pass(log_c, log_1mc, outcome, [best], block_rows, False, True)[1][0]
    _, kl_sum, loss = _beta_pass(log_c, log_1mc, outcome, grid, block_rows, False, True)
    index = _best_label_loss(loss)
    return grid[index], kl_sum[index]


def _binary_error(
    log_probs: Tensor,
    target: Tensor,
    variant: str,
    bandwidth: float | None,
    grid: Sequence[float],
    rule: str,
    block_rows: int,
) -> tuple[Tensor, float]:
    """(CE_KL estimate, bandwidth) of the ``top_label`` or ``classwise`` variant."""
    n, num_classes = log_probs.shape
    log_c, log_1mc, correct = _top_label_problem(log_probs, target)
    if num_classes == 1:  # one class: always right with confidence 1, calibrated by definition
        return log_probs.new_zeros(()), math.nan if bandwidth is None else float(bandwidth)
    if bandwidth is None:
        bandwidth, kl_sum = _select_beta(log_c, log_1mc, correct, grid, rule, block_rows)
    elif variant == "top_label":
        kl_sum = _beta_pass(log_c, log_1mc, correct, [bandwidth], block_rows, False, True)[1][0]
    if variant == "top_label":
        return kl_sum / n, float(bandwidth)
    top = log_probs.argmax(1)
    total = log_probs.new_zeros(())
    for k in range(num_classes):
        problem = _class_problem(log_probs, target, k, log_1mc, top)
        total += _beta_pass(*problem, [bandwidth], block_rows, False, True)[1][0]
    return total / (n * num_classes), float(bandwidth)


def kl_calibration_error(
    preds: Tensor,
    target: Tensor,
    input_type: InputType = "logits",
    bandwidth: float | None = None,
    bandwidth_grid: Sequence[float] | None = None,
    block_size: int | None = None,
    variant: Variant = "canonical",
    bandwidth_rule: BandwidthRule = "likelihood",
) -> KLCalibrationResult:
    """KL calibration error :math:`\\widehat{\\mathrm{CE}}_{KL}` of predictions (see the module docstring).

    Args:
        preds: (n, K) logits (``input_type="logits"``, preferred: log-softmax in float64 keeps exact zeros
            finite) or probabilities (``"probs"``: clamped to ``PROB_EPS`` = 1e-12 and renormalised).
            K >= 2, except ``variant="top_label"``, which accepts K = 1 (value 0).
        target: (n,) integer labels in [0, K).
        bandwidth: kernel bandwidth b > 0; ``None`` selects it by ``bandwidth_rule`` on ``bandwidth_grid``
            (default :data:`DEFAULT_BANDWIDTHS`).
        block_size: rows processed at once; peak memory is about 4 · block_size · n · 8 bytes plus a few
            copies of the (n, K) inputs. Default: 2¹⁷ / n rows (1 MB per work matrix, cache-resident), at
            least 64 when K >= 256 (canonical). Any value gives the same bandwidth and value up to float64
            round-off.
        variant: ``"canonical"`` (Dirichlet kernel, K-way label), ``"top_label"`` (Beta kernel on the
            confidence vs correctness) or ``"classwise"`` (Beta kernel per class, averaged over classes).
        bandwidth_rule: ``"likelihood"`` (leave-one-out likelihood of the predictions' kernel density, the
            paper's rule) or ``"label_loss"`` (leave-one-out log loss of the label estimate).

    Returns:
        :class:`KLCalibrationResult` ``(value, bandwidth)``: value is a 0-dim float64 tensor on ``preds``'
        device (nats, >= 0 up to round-off), bandwidth the b used (NaN for top-label with K = 1).

    Cost at n samples: canonical O(n² K / block) matmul work plus O(n²) per grid bandwidth; top-label
    O(n²) per grid bandwidth; classwise that plus O(K n²) at the selected bandwidth.

    Example:
        >>> logits, labels = torch.randn(100, 3), torch.randint(3, (100,))
        >>> value, b = kl_calibration_error(logits, labels, variant="top_label")
    """
    check_kl_calibration_options(input_type, bandwidth, bandwidth_grid, block_size, variant, bandwidth_rule)
    check_preds_target(preds, target, input_type, min_classes=1 if variant == "top_label" else 2)
    n = preds.shape[0]
    if n < 2:
        raise ValueError(f"the leave-one-out estimate needs at least 2 samples, got n = {n}.")
    log_probs = (
        preds.detach().double().zero_() if preds.shape[1] == 1 else log_probabilities(preds, input_type)
    )
    target = target.to(device=preds.device, dtype=torch.long)
    grid = [float(b) for b in (DEFAULT_BANDWIDTHS if bandwidth_grid is None else bandwidth_grid)]
    if variant != "canonical":
        rows = _block_rows(n, block_size, _BINARY_ROWS_AS_CLASSES)
        value, used = _binary_error(
            log_probs, target, variant, None if bandwidth is None else float(bandwidth), grid, bandwidth_rule, rows
        )
        return KLCalibrationResult(value, used)
    rows = _block_rows(n, block_size, preds.shape[1])
    probs = log_probs.exp()
    if bandwidth is None and bandwidth_rule == "likelihood":
        bandwidth, kl_sum = _select(log_probs, probs, grid, rows, target)
    elif bandwidth is None:
        _, kl_sums, loss = _float64_pass(log_probs, probs, grid, _normalisers(probs, grid), rows, target, False)
        index = _best_label_loss(loss)
        bandwidth, kl_sum = grid[index], kl_sums[index]
    else:
        bandwidth = float(bandwidth)
        _, kl_sums, _ = _float64_pass(
            log_probs, probs, [bandwidth], _normalisers(probs, [bandwidth]), rows, target, False
        )
        kl_sum = kl_sums[0]
    return KLCalibrationResult(kl_sum / n, float(bandwidth))


def check_kl_calibration_options(
    input_type: str,
    bandwidth: float | None,
    bandwidth_grid: Sequence[float] | None,
    block_size: int | None,
    variant: str,
    bandwidth_rule: str,
) -> None:
    """Require valid options of :func:`kl_calibration_error`; its metric class checks them when it is built."""
    check_variant(variant, bandwidth_rule)
    check_input_type(input_type)
    _check_bandwidths(bandwidth, bandwidth_grid)
    if block_size is not None:
        check_positive_int(block_size, "block_size")


def check_variant(variant: str, bandwidth_rule: str = "likelihood") -> None:
    """Require a known ``variant`` and ``bandwidth_rule`` of :func:`kl_calibration_error`."""
    if variant not in VARIANTS:
        raise ValueError(f"`variant` must be one of {list(VARIANTS)}, got {variant!r}.")
    if bandwidth_rule not in BANDWIDTH_RULES:
        raise ValueError(f"`bandwidth_rule` must be one of {list(BANDWIDTH_RULES)}, got {bandwidth_rule!r}.")
