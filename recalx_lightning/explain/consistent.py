"""Coalition values at exact levels, and the temperature-consistent marginal contribution.

Every perturbation-based attribution is built from marginal contributions
``v(S ∪ {j}) − v(S)`` of a value function over coalitions S of kept features. With a level-dependent
temperature the value of a coalition is ``v(S) = g(f(x_S) / T(λ(S)))_y`` (``g`` = softmax, log-softmax or
identity, ``y`` the target class), so each marginal contribution mixes two effects:

    v(S∪j) − v(S) = [g(f(x_{S∪j}) / T*) − g(f(x_S) / T*)]                      what feature j does to the input
                  + [g(f(x_{S∪j}) / T(λ_{S∪j})) − g(f(x_{S∪j}) / T*)]
                  − [g(f(x_S) / T(λ_S)) − g(f(x_S) / T*)]                       the switch of temperature

The switch part is non-zero even when replacing feature j leaves the input unchanged (a patch of empty
background): it adds a near-constant amount to every feature. The *consistent* mode keeps only the first
bracket: both coalitions of a marginal are scored at one temperature ``T*`` chosen by a rule:

    ``"smaller"``  T* = T(λ(S))          the smaller coalition's (higher level) temperature
    ``"larger"``   T* = T(λ(S ∪ j))      the larger coalition's (lower level) temperature
    ``"mean"``     T* = √(T(λ(S)) · T(λ(S ∪ j)))   the geometric mean, i.e. the average of log T — the
                                         calibrators' own parametrisation; symmetric in the two coalitions
                                         (default)

Since a coalition's logits do not depend on the temperature, consistent values need no extra model
evaluations: each coalition is scored once as the smaller and once as the larger member of a marginal.
Consequences: a feature whose replacement leaves the input unchanged gets 0 (bit-exact when the model's output
for a row does not depend on the rest of its batch; otherwise up to float round-off); a constant temperature
gives the plain attributions; efficiency (attributions summing to v(N) − v(∅)) holds only approximately.

Levels depend only on the coalition's size k: λ = (d − k)/d. Both roles' temperatures are therefore tables
over k = 0..d (:func:`role_temperatures`). With the *effective* level (``level="effective"``) they depend only on
the number k of the input's m informative features that the coalition keeps, λ_eff = (m − k)/m: the tables are
then per input, over k = 0..m (entries above m are never used). A marginal of an informative feature moves k to
k + 1 and takes the same pair temperatures as above; a marginal of an uninformative feature leaves both the
input and the level unchanged, so every rule scores both coalitions at the same temperature and its
contribution is exactly 0 — plain and consistent agree on it, and the engine sets it to 0 without evaluating.

Surrogate methods (LIME, KernelSHAP)
------------------------------------
A linear surrogate ``v(z) ≈ b + Σ_j φ_j z_j`` fitted on sampled coalitions z never forms marginals, so there is
no pair to score at one temperature. With level-dependent temperatures its targets carry a trend in the level
λ = 1 − mean(z), which is a linear function of the regressors shared by every feature: the fit spreads it over
all features (a feature whose replacement changes nothing receives a share of it). A level regressor cannot
absorb the trend — it is collinear with the features and the intercept. The consistent correction instead
scores *every* sampled coalition at one shared temperature ``T*``, so the targets ``g(f(x_S)/T*)`` hold no
temperature trend at all; the surrogate then estimates the attribution of the model at temperature ``T*``
(for KernelSHAP: the Shapley values of the game ``S ↦ g(f(x_S)/T*)``, for which a null feature's value is 0).

``T*`` is a weighted geometric mean of the calibrator's temperatures over the surrogate's *level
distribution* q(k): the probability that the method's sampler draws a coalition of size k times the sample
weight the surrogate fit gives it (:func:`surrogate_size_weights`):

    LIME (Captum's default sampler and kernel)  q(k) = C(d, k) 2^{−d} · exp(−(1 − √(k/d))² / 2)
                                                (Bernoulli(½) per feature; cosine-distance exponential kernel)
    KernelSHAP                                  q(k) ∝ 1 / (k (d − k)),  k = 1..d−1  (Captum's size draw; the
                                                forced full and empty coalitions are constraints, not draws)

and the rules mirror the marginal ones — which coalitions the coefficient φ_j contrasts (:func:`surrogate_temperature`):

    ``"mean"``     log T* = Σ_k q(k) log T(k) / Σ_k q(k)                 all sampled coalitions (default)
    ``"smaller"``  weights q(k)·(d − k): the coalitions without a given feature (z_j = 0), the smaller member
    ``"larger"``   weights q(k)·k: the coalitions with it (z_j = 1), the larger member

log T* of ``"mean"`` is the average of those of ``"smaller"`` and ``"larger"`` weighted by E_q[d − k] and E_q[k]:
their exact log-midpoint for KernelSHAP (q symmetric), close to it for LIME (its kernel favours large k).
``T*`` is computed in closed form from the distribution rather than from the coalitions actually drawn: it is
then the same for every input and seed (the estimate converges, as samples grow, to the explanation of one
fixed game), needs no second pass over cached logits, and equals the expectation of the empirical geometric
mean. Since a coalition's logits do not depend on the temperature, the consistent mode costs no extra model
evaluation: it is Captum's own Lime/KernelShap run with the calibrator replaced by ``GlobalTemperature(T*)``.
A constant temperature gives ``T* = T`` bit for bit, hence the plain attributions exactly.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from recalx_lightning.calibrators import TemperatureCalibrator, apply_temperature
from recalx_lightning.perturbation import level_from_counts

Mode = Literal["plain", "consistent"]
ConsistentRule = Literal["smaller", "larger", "mean"]
Output = Literal["probs", "log_probs", "logits"]

MODES = ("plain", "consistent")
CONSISTENT_RULES = ("smaller", "larger", "mean")
OUTPUTS = ("probs", "log_probs", "logits")
SURROGATE_METHODS = ("lime", "kernel_shap")


def size_temperatures(
    calibrator: TemperatureCalibrator | None, num_features: int, informative_counts: Tensor | None = None
) -> Tensor:
    """T(λ) of a coalition of each size k = 0..d, float64 on the CPU.

    Without ``informative_counts``: λ = (d − k)/d, shape (d + 1,). With the numbers m_i of informative features
    of n inputs, (n,): k counts kept informative features and λ_eff = (m_i − k)/m_i (k clipped to m_i),
    shape (n, d + 1).
    """
    sizes = torch.arange(num_features + 1, dtype=torch.float64)
    if informative_counts is None:
        levels = level_from_counts(sizes, num_features)
    else:
        totals = informative_counts.detach().to("cpu", torch.float64)[:, None]
        levels = level_from_counts(torch.minimum(sizes[None], totals), totals)
    if calibrator is None:
        return torch.ones_like(levels)
    with torch.no_grad():
        device = calibrator.log_temperature.device
        flat = calibrator.temperature(levels.reshape(-1).to(device)).detach().double().cpu()
    return flat.view(levels.shape)


def pair_temperatures(own: Tensor, rule: ConsistentRule) -> Tensor:
    """T* of the marginal from size k to k + 1 for k = 0..d−1, shape (..., d), from own temperatures (..., d + 1)."""
    if rule not in CONSISTENT_RULES:
        raise ValueError(f"`consistent_temperature` must be one of {CONSISTENT_RULES}, got {rule!r}.")
    smaller, larger = own[..., :-1], own[..., 1:]
    if rule == "smaller":
        return smaller.clone()
    if rule == "larger":
        return larger.clone()
    return (smaller * larger).sqrt()


def role_temperatures(
    calibrator: TemperatureCalibrator | None,
    num_features: int,
    mode: Mode = "plain",
    rule: ConsistentRule = "mean",
    informative_counts: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Temperatures of a size-k coalition as the smaller and as the larger member of a marginal.

    Returns ``(as_smaller, as_larger)``, each (d + 1,) float64 — or (n, d + 1) per input with
    ``informative_counts`` (n,) (effective level, k = kept informative features; see :func:`size_temperatures`).
    In plain mode both are the coalition's own T(λ); in consistent mode ``as_smaller[k] = T*(k → k+1)`` and
    ``as_larger[k] = T*(k−1 → k)`` (ends, which never play that role, keep their own temperature).
    """
    if mode not in MODES:
        raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}.")
    own = size_temperatures(calibrator, num_features, informative_counts)
    if mode == "plain":
        return own, own.clone()
    pair = pair_temperatures(own, rule)
    as_smaller, as_larger = own.clone(), own.clone()
    as_smaller[..., :-1] = pair
    as_larger[..., 1:] = pair
    return as_smaller, as_larger


def target_values(logits: Tensor, temperature: Tensor, target: Tensor, output: Output = "probs") -> Tensor:
    """``g(logits / T)[target]`` in float64.

    Args:
        logits: (m, K) raw logits.
        temperature: (m,) temperature per row.
        target: (m,) class index per row.
        output: ``g``: ``"probs"`` (softmax), ``"log_probs"`` or ``"logits"`` (scaled logits).
    Returns:
        (m,) float64.
    """
    scaled = apply_temperature(logits.double(), temperature.to(dtype=torch.float64))
    if output == "probs":
        scaled = scaled.softmax(-1)
    elif output == "log_probs":
        scaled = scaled.log_softmax(-1)
    return scaled.gather(1, target[:, None].to(logits.device)).squeeze(1)


# --------------------------------------------------------------------------------- surrogate methods
def surrogate_size_weights(method: str, num_features: int) -> Tensor:
    """q(k), k = 0..d: how much a size-k coalition weighs in the surrogate fit (sampling × sample weight).

    Normalised to sum to 1, shape (d + 1,) float64 on the CPU. ``"lime"``: Captum's default sampler
    (Bernoulli(½) per feature, so sizes are Binomial(d, ½)) times its default similarity
    ``exp(−(1 − cos(1, z))² / 2)`` with ``cos(1, z) = √(k/d)`` (0 for the empty coalition). ``"kernel_shap"``:
    Captum's size distribution ∝ 1/(k(d − k)) over k = 1..d−1 with unit weights; for d = 1 (no interior size)
    the two ends, equally.
    """
    if method not in SURROGATE_METHODS:
        raise ValueError(f"`method` must be one of {SURROGATE_METHODS}, got {method!r}.")
    d = int(num_features)
    if d < 1:
        raise ValueError(f"`num_features` must be ≥ 1, got {num_features}.")
    k = torch.arange(d + 1, dtype=torch.float64)
    if method == "lime":
        log_binomial = math.lgamma(d + 1) - torch.lgamma(k + 1) - torch.lgamma(d - k + 1) - d * math.log(2.0)
        log_kernel = -((1 - (k / d).sqrt()) ** 2) / 2
        log_q = log_binomial + log_kernel
        q = (log_q - log_q.max()).exp()
    elif d == 1:
        q = torch.ones(2, dtype=torch.float64)
    else:
        q = torch.zeros(d + 1, dtype=torch.float64)
        q[1:d] = 1.0 / (k[1:d] * (d - k[1:d]))
    return q / q.sum()


def surrogate_log_temperature(
    calibrator: TemperatureCalibrator | None,
    num_features: int,
    method: str,
    rule: ConsistentRule = "mean",
) -> Tensor:
    """log T* of consistent LIME/KernelSHAP (0-dim float64 on the CPU); see the module notes for the rules.

    Computed as ``θ_0 + Σ_k w_k (θ_k − θ_0)`` over the sizes with weight (θ_k = log T of size k), so a
    constant temperature returns exactly its own θ (no round-off): consistent then equals plain bit for bit.
    """
    if rule not in CONSISTENT_RULES:
        raise ValueError(f"`consistent_temperature` must be one of {CONSISTENT_RULES}, got {rule!r}.")
    d = int(num_features)
    q = surrogate_size_weights(method, d)
    if calibrator is None:
        return torch.zeros((), dtype=torch.float64)
    k = torch.arange(d + 1, dtype=torch.float64)
    weights = {"mean": q, "smaller": q * (d - k), "larger": q * k}[rule]
    weights = weights / weights.sum()
    used = torch.nonzero(weights > 0).flatten()
    levels = (d - k[used]) / d
    with torch.no_grad():
        device = calibrator.log_temperature.device
        theta = calibrator.log_temperature_at(levels.to(device)).detach().double().cpu()
    first = theta[0]
    return first + (weights[used] * (theta - first)).sum()


def surrogate_temperature(
    calibrator: TemperatureCalibrator | None,
    num_features: int,
    method: str,
    rule: ConsistentRule = "mean",
) -> float:
    """The shared temperature T* at which consistent LIME/KernelSHAP score every coalition (1 if uncalibrated)."""
    return float(surrogate_log_temperature(calibrator, num_features, method, rule).exp())
