"""One entry point for perturbation attributions at exact perturbation levels: :func:`explain`.

The value of a coalition S of kept features (``keep`` row z ∈ {0,1}^d) for input x and target class y is

    v(S) = g( f(x_S) / T(λ(S)) )_y,        λ(S) = (d − |S|) / d,    g ∈ {softmax, log-softmax, identity}

with ``T ≡ 1`` when no calibrator is given. Methods (d = number of features of the perturbation):

=====================  ====================================================================  ================
method                 attribution φ_j                                                       evaluations / x
=====================  ====================================================================  ================
``shapley_sampling``   mean over P random permutations π of v(π_{<j} ∪ j) − v(π_{<j})         P·(d − 1) + 2
                       (Captum's ShapleyValueSampling: from all-baseline, add features in
                       the order of π; the same ``seed`` draws the same permutations)
``shapley_exact``      Σ_{S ⊆ N∖j} |S|!(d−|S|−1)!/d! · (v(S ∪ j) − v(S)), all 2^d coalitions  2^d
``feature_ablation``   v(N) − v(N ∖ j): remove one feature at a time                          d + 1
``occlusion``          the same as ``feature_ablation``: occluding one feature (patch) of
                       the perturbation's grouping. Captum's sliding-window Occlusion is not
                       used: overlapping windows do not form coalitions of the grouping, so
                       their level would not be an exact λ(S)
``lime``               coefficients of a weighted linear surrogate of v(z) on z; Captum's     P
                       Lime with Bernoulli(½) samples and cosine kernel on z
``kernel_shap``        Captum's KernelShap (Shapley-kernel weighted linear regression)        P
=====================  ====================================================================  ================

The Shapley and ablation methods run on a native batched sampler by default (``backend="native"``): each
coalition's raw logits are computed once, in batches of ``perturbations_per_eval`` coalitions per input,
and temperatures are applied afterwards. It reproduces Captum's results for the same seed
(``backend="captum"`` runs Captum itself, on the 0/1 keep vector so that levels are exact, see
:class:`~recalx_lightning.classifier.RecalibratedClassifier`), evaluates the empty and full coalition once
instead of once per permutation, and avoids Captum's per-element Python loop over large feature masks.
``mode="consistent"`` removes the level-dependent temperature switch from the attributions — see
:mod:`recalx_lightning.explain.consistent`. Shapley and ablation methods (native backend) score both
coalitions of each marginal at one temperature; LIME and KernelSHAP (Captum backend), whose surrogate sees the
level only as a trend shared by all features, score every sampled coalition at one temperature T* derived from
the sampler's level distribution (:func:`~recalx_lightning.explain.consistent.surrogate_temperature`,
reported as ``Explanation.shared_temperature``). Plain LIME/KernelSHAP are Captum's results exactly (same
seed); consistent ones are Captum's results for ``GlobalTemperature(T*)``, with no extra model evaluation.

LIME's surrogate defaults to ridge regression (``surrogate="ridge"``, sklearn's ``Ridge(alpha=1)``): Captum's
default ``Lasso(alpha=0.01)`` returns all-zero attributions when the outputs are flat (probabilities
near 0 or 1 vary by less than alpha), and since a temperature changes the scale of the outputs, Lasso's
sparsity would differ between calibrators for reasons unrelated to calibration. ``"lasso"`` and
``"linear"`` remain available, as does any Captum ``Model``.
``level="effective"`` scores each coalition at the temperature of its effective level λ_eff(S; x) — the share of
the input's informative features it replaces (:mod:`recalx_lightning.perturbation`) — instead of λ(S). The
calibrated value then depends on S only through the perturbed input, so it is a proper game: a feature whose
replacement changes nothing is a null player, and plain Shapley values keep efficiency, symmetry and linearity.
The native engine indexes per-input temperature tables by the number of kept informative features. The Captum
backend (LIME, KernelSHAP, ``backend="captum"``) explains, per input, the keep vector of its m informative
features only (the others stay kept: they do not change the input), so an uninformative feature gets exactly 0
and the surrogate's sampler and kernel act on the features that exist; consistent LIME/KernelSHAP use the
shared temperature of that m-feature sampler, which is then exact for λ_eff. When every feature of every input
is informative, ``"effective"`` takes the paper path and its results equal ``"paper"`` bit for bit.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from recalx_lightning._checks import check_finite, check_model_logits, check_positive_int
from recalx_lightning.calibrators import GlobalTemperature, TemperatureCalibrator
from recalx_lightning.classifier import RecalibratedClassifier
from recalx_lightning.explain.consistent import (
    CONSISTENT_RULES,
    MODES,
    OUTPUTS,
    SURROGATE_METHODS,
    ConsistentRule,
    Mode,
    Output,
    role_temperatures,
    surrogate_log_temperature,
    target_values,
)
from recalx_lightning.perturbation import LevelKind, Perturbation, check_level

Method = Literal["shapley_sampling", "shapley_exact", "lime", "kernel_shap", "feature_ablation", "occlusion"]
Backend = Literal["auto", "native", "captum"]
METHODS = ("shapley_sampling", "shapley_exact", "lime", "kernel_shap", "feature_ablation", "occlusion")
NATIVE_METHODS = ("shapley_sampling", "shapley_exact", "feature_ablation", "occlusion")
SURROGATES = ("ridge", "linear", "lasso")
MAX_EXACT_FEATURES = 16
DEFAULT_SAMPLES = {"shapley_sampling": 25, "lime": 200, "kernel_shap": 200}


@dataclass
class Explanation:
    """Attributions of a batch of n inputs over the d features of a perturbation.

    Attributes:
        attributions: (n, d) float64 per-feature attributions.
        maps: (n, *feature_mask.shape) the same values spread onto the feature mask (e.g. (n, H, W)).
        targets: (n,) int64 explained classes.
        method, mode, backend: how they were computed.
        num_evaluations: model evaluations (single inputs) spent on coalitions; the one forward of the n
            unperturbed inputs that checks their outputs and gives ``predictions`` comes on top.
        shared_temperature: consistent LIME/KernelSHAP only: the one temperature T* every coalition was
            scored at (``None`` otherwise); at the effective level, where T* depends on each input's number of
            informative features, their geometric mean.
        predictions: (n,) int64 the model's predicted classes on the unperturbed inputs.
    """

    attributions: Tensor
    maps: Tensor
    targets: Tensor
    method: str
    mode: str
    backend: str
    num_evaluations: int
    shared_temperature: float | None = None
    predictions: Tensor | None = None


def explain(
    model: nn.Module | Callable[[Tensor], Tensor],
    inputs: Tensor,
    perturbation: Perturbation,
    calibrator: TemperatureCalibrator | None = None,
    target: Tensor | int | None = None,
    method: Method = "shapley_sampling",
    *,
    mode: Mode = "plain",
    consistent_temperature: ConsistentRule = "mean",
    output: Output = "probs",
    num_samples: int | None = None,
    perturbations_per_eval: int = 64,
    seed: int | None = 0,
    backend: Backend = "auto",
    surrogate: str | object = "ridge",
    level: LevelKind = "paper",
) -> Explanation:
    """Explain ``model``'s (recalibrated) prediction for each input over the perturbation's features.

    Args:
        model: maps a batch (m, *S) to logits (m, K); called under ``torch.no_grad``.
        inputs: (n, *S) inputs on the model's device (CPU or GPU).
        perturbation: feature mask (d features) and baseline.
        calibrator: temperature calibrator applied at each coalition's exact level; ``None``: uncalibrated.
        target: class per input (n,), one class for all, or ``None`` for the model's prediction on ``inputs``.
        method: see the module table.
        mode: ``"plain"`` (each coalition at its own temperature) or ``"consistent"`` (Shapley/ablation, native
            backend: both coalitions of a marginal at one temperature; LIME/KernelSHAP: every sampled
            coalition at one shared temperature T*).
        consistent_temperature: the consistent mode's rule: ``"mean"`` (geometric mean), ``"smaller"`` or
            ``"larger"`` coalition's temperature; for LIME/KernelSHAP the geometric mean of T(λ) over the
            sampler's level distribution, over all coalitions (``"mean"``), over those lacking a feature
            (``"smaller"``) or over those holding it (``"larger"``), see
            :func:`~recalx_lightning.explain.consistent.surrogate_temperature`.
        output: value explained: ``"probs"`` (paper), ``"log_probs"`` or ``"logits"`` (scaled logits).
        num_samples: permutations (Shapley sampling, default 25) or surrogate samples (LIME, KernelSHAP,
            default 200); ignored by exact and ablation methods.
        perturbations_per_eval: coalitions per input evaluated in one model call (batch n × this).
        seed: seeds the permutations/samples (``torch.manual_seed`` semantics, the caller's RNG state is
            restored afterwards); ``None`` uses the current global RNG.
        backend: ``"native"``, ``"captum"`` or ``"auto"`` (native where available).
        surrogate: LIME's linear model: ``"ridge"`` (default), ``"linear"``, ``"lasso"`` or a Captum ``Model``.
        level: the level whose temperature scores a coalition: ``"paper"`` (λ(S), default) or ``"effective"``
            (λ_eff(S; x), see the module notes); use the level the calibrator was fitted on.

    Returns:
        :class:`Explanation` with (n, d) attributions and the per-pixel maps.
    """
    return explain_variants(
        model, inputs, perturbation, {mode: (calibrator, mode)}, target, method,
        consistent_temperature=consistent_temperature, output=output, num_samples=num_samples,
        perturbations_per_eval=perturbations_per_eval, seed=seed, backend=backend, surrogate=surrogate, level=level,
    )[mode]


def explain_variants(
    model: nn.Module | Callable[[Tensor], Tensor],
    inputs: Tensor,
    perturbation: Perturbation,
    variants: Mapping[str, tuple[TemperatureCalibrator | None, Mode]],
    target: Tensor | int | None = None,
    method: Method = "shapley_sampling",
    *,
    consistent_temperature: ConsistentRule = "mean",
    output: Output = "probs",
    num_samples: int | None = None,
    perturbations_per_eval: int = 64,
    seed: int | None = 0,
    backend: Backend = "auto",
    surrogate: str | object = "ridge",
    level: LevelKind = "paper",
) -> dict[str, Explanation]:
    """Explain ``inputs`` under several (calibrator, mode) variants from one pass of model evaluations.

    The coalitions a method visits depend only on the method, the seed and the inputs, and a coalition's
    logits do not depend on the temperature; so each coalition is evaluated once and every variant is scored
    from the same logits. The result of each variant equals that of a separate :func:`explain` call with the
    same arguments (bit for bit in our tests); the cost is that of one variant.

    Args:
        variants: ``{name: (calibrator or None, mode)}``, e.g. ``{"uncalibrated/plain": (None, "plain"),
            "binned/consistent": (binned, "consistent")}``.
        Other arguments: as for :func:`explain`.

    Returns:
        ``{name: Explanation}``; every explanation reports the shared pass's ``num_evaluations``.
    """
    if not variants:
        raise ValueError("`variants` must name at least one (calibrator, mode) pair.")
    for _, mode in variants.values():
        _check_args(inputs, perturbation, method, mode, consistent_temperature, output, perturbations_per_eval,
                    backend)
    check_level(level)
    if backend == "auto":
        backend = "native" if method in NATIVE_METHODS else "captum"
    if backend == "native" and method not in NATIVE_METHODS:
        raise ValueError(f"method={method!r} has no native backend; use backend='captum' (or 'auto').")
    if backend != "native" and method not in SURROGATE_METHODS and any(m == "consistent" for _, m in
                                                                          variants.values()):
        raise ValueError(
            f"mode='consistent' with method={method!r} needs backend='native': Captum's Shapley/ablation "
            "methods score each coalition once, at its own temperature."
        )
    d = perturbation.num_features
    informative = perturbation.informative_features(inputs, level)
    if informative is not None and bool(informative.all()):
        informative = None  # identical levels: take the paper path (bit for bit)
    if method == "shapley_exact" and d > MAX_EXACT_FEATURES:
        raise ValueError(
            f"method='shapley_exact' enumerates 2^d coalitions; d = {d} exceeds {MAX_EXACT_FEATURES}. Use "
            "'shapley_sampling' or a coarser feature mask."
        )
    if num_samples is None:
        num_samples = DEFAULT_SAMPLES.get(method, 1)
    check_positive_int(num_samples, "num_samples")
    surrogate_model = _make_surrogate(surrogate) if method == "lime" else None
    names = list(variants)
    calibrators, shared_temperatures = [], []
    for name in names:
        calibrator, mode = variants[name]
        if mode == "consistent" and method in SURROGATE_METHODS and informative is None:
            # at the effective level T* depends on each input's informative count: see _captum_attribute_effective
            calibrator, shared = _surrogate_shared(calibrator, d, method, consistent_temperature)
        else:
            shared = None
        calibrators.append(calibrator)
        shared_temperatures.append(shared)

    with torch.no_grad():
        targets, predictions = _resolve_target(model, inputs, target)
        if backend == "native":
            with _seeded(seed):
                counts = None if informative is None else informative.sum(1)
                tables = [role_temperatures(c, d, variants[name][1], consistent_temperature, counts)
                          for c, name in zip(calibrators, names, strict=True)]
                evaluator = _CoalitionValues(model, inputs, targets, perturbation, output, perturbations_per_eval,
                                             tables, informative)
                stacked = _NATIVE[method](evaluator, num_samples)
            evaluations = evaluator.num_evaluations
            results = list(stacked.double().chunk(len(names)))
            if informative is not None:
                # consistent mode: same input and level on both sides of an uninformative feature's marginal
                results = [r.masked_fill(~informative, 0.0) if variants[name][1] == "consistent" else r
                           for r, name in zip(results, names, strict=True)]
        else:
            modes = [variants[name][1] for name in names]
            results, evaluations, effective_shared = _captum_variants(
                method, model, inputs, targets, perturbation, calibrators, modes, output, num_samples,
                perturbations_per_eval, surrogate_model, seed, informative, consistent_temperature,
            )
            if informative is not None:
                shared_temperatures = effective_shared
    explanations = {}
    for name, attributions, shared in zip(names, results, shared_temperatures, strict=True):
        attributions = attributions.double()
        explanations[name] = Explanation(
            attributions=attributions,
            maps=perturbation.to_pixels(attributions),
            targets=targets,
            method=method,
            mode=variants[name][1],
            backend=backend,
            num_evaluations=int(evaluations),
            shared_temperature=shared,
            predictions=predictions,
        )
    return explanations


def _surrogate_shared(calibrator, d: int, method: str, rule: str) -> tuple[TemperatureCalibrator | None, float]:
    """Consistent LIME/KernelSHAP: ``GlobalTemperature(T*)`` in place of ``calibrator``, and T*."""
    if calibrator is None:
        return None, 1.0
    log_t = surrogate_log_temperature(calibrator, d, method, rule)
    shared = GlobalTemperature(calibrator.min_temperature, calibrator.max_temperature)
    shared.set_log_temperatures(log_t.reshape(1), warn_on_bounds=False)
    return shared.to(calibrator.log_temperature.device), float(shared.temperatures[0])


# ------------------------------------------------------------------------------------------- checks
def _check_args(inputs, perturbation, method, mode, rule, output, perturbations_per_eval, backend) -> None:
    if not isinstance(inputs, Tensor) or inputs.ndim < 2 or inputs.shape[0] == 0:
        raise ValueError("`inputs` must be a non-empty batch tensor of shape (n, *S).")
    if not isinstance(perturbation, Perturbation):
        raise ValueError("`perturbation` must be a recalx_lightning.Perturbation (feature mask + baseline).")
    perturbation.check_input(inputs)
    check_finite(inputs, "inputs", fix="Attributions of such inputs would be NaN; repair or drop them.")
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {METHODS}, got {method!r}.")
    if mode not in MODES:
        raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}.")
    if rule not in CONSISTENT_RULES:
        raise ValueError(f"`consistent_temperature` must be one of {CONSISTENT_RULES}, got {rule!r}.")
    if output not in OUTPUTS:
        raise ValueError(f"`output` must be one of {OUTPUTS}, got {output!r}.")
    if backend not in ("auto", "native", "captum"):
        raise ValueError(f"`backend` must be 'auto', 'native' or 'captum', got {backend!r}.")
    check_positive_int(perturbations_per_eval, "perturbations_per_eval")


def _resolve_target(model, inputs: Tensor, target) -> tuple[Tensor, Tensor]:
    """``(explained class, predicted class)`` per input, from the model's outputs on ``inputs`` (checked to be
    logits)."""
    n = inputs.shape[0]
    outputs = model(inputs)
    check_model_logits(outputs)
    num_classes = outputs.shape[1]
    predictions = outputs.argmax(-1).long()
    if target is None:
        return predictions, predictions
    if isinstance(target, int) and not isinstance(target, bool):
        target = torch.full((n,), target, dtype=torch.long, device=inputs.device)
    if not isinstance(target, Tensor) or target.shape != (n,) or target.is_floating_point():
        raise ValueError(f"`target` must be an int, None or an integer tensor of shape ({n},).")
    if target.numel() and (target.min() < 0 or target.max() >= num_classes):
        raise ValueError(
            f"`target` must lie in [0, {num_classes}) (the model has {num_classes} classes); got values in "
            f"[{int(target.min())}, {int(target.max())}]."
        )
    return target.long().to(inputs.device), predictions


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """Seed the global CPU RNG like ``torch.manual_seed`` (what Captum draws from), then restore it."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# ------------------------------------------------------------------------------------- native engine
class _CoalitionValues:
    """Values of coalitions (rows of a keep matrix shared by all n inputs) in both marginal roles.

    ``__call__(keep (r, d) bool)`` returns ``(as_smaller, as_larger)``, each (V·n, r) float64: the target value
    of each coalition at its temperature as the smaller / larger member of a marginal (equal in plain mode),
    for each of V temperature tables (``tables``: one ``(as_smaller, as_larger)`` pair per variant), rows
    variant-major. Raw logits are computed once per coalition, in batches of ``perturbations_per_eval``
    coalitions × n, and shared by all variants.
    """

    def __init__(self, model, inputs, targets, perturbation, output, per_eval, tables, informative=None):
        self.model, self.x, self.targets, self.output = model, inputs, targets, output
        # effective level: tables (n, d + 1) indexed by the number of kept informative features of each input
        self.informative = None if informative is None else informative.to(inputs.device)
        self.per_eval = per_eval
        self.num_features = perturbation.num_features
        self.baseline = perturbation.baseline(inputs)
        self.difference = inputs - self.baseline if inputs.is_floating_point() else None
        self._buffers: tuple[Tensor, Tensor] | None = None
        self.perturbation = perturbation
        self.mask_size = perturbation.feature_mask.numel()
        self.tables = [(small.to(inputs.device), large.to(inputs.device)) for small, large in tables]
        self.num_rows = len(self.tables) * inputs.shape[0]
        self.num_evaluations = 0

    def perturbed(self, keep: Tensor) -> Tensor:
        """Inputs of the c coalitions for every input, (n·c, *S), input-major.

        Floating inputs are built as ``b + (x − b)·m`` into buffers reused across batches: allocating a fresh
        batch of images per call costs more than building it (first-touch page faults).
        """
        c, n = keep.shape[0], self.x.shape[0]
        sample_ndim = self.x.ndim - 1
        if not self.x.is_floating_point():
            elements = self.perturbation.element_keep(keep, sample_ndim)
            batch = torch.where(elements.unsqueeze(0), self.x.unsqueeze(1), self.baseline.unsqueeze(1))
            return batch.reshape(-1, *self.x.shape[1:])
        if self._buffers is None or self._buffers[0].numel() < c * self.mask_size:
            self._buffers = (
                torch.empty(c * self.mask_size, dtype=self.x.dtype, device=self.x.device),
                torch.empty(n * c * self.x[0].numel(), dtype=self.x.dtype, device=self.x.device),
            )
        mask_buffer, out_buffer = self._buffers
        elements = self.perturbation.element_keep(keep, sample_ndim, self.x.dtype, buffer=mask_buffer)
        out = out_buffer[: n * c * self.x[0].numel()].view(n, c, *self.x.shape[1:])
        torch.addcmul(self.baseline.unsqueeze(1), self.difference.unsqueeze(1), elements.unsqueeze(0), out=out)
        return out.view(n * c, *self.x.shape[1:])

    def __call__(self, keep: Tensor) -> tuple[Tensor, Tensor]:
        n = self.x.shape[0]
        smaller = [[] for _ in self.tables]
        larger = [[] for _ in self.tables]
        for start in range(0, keep.shape[0], self.per_eval):
            chunk = keep[start : start + self.per_eval].to(self.x.device)
            c = chunk.shape[0]
            logits = self.model(self.perturbed(chunk))
            self.num_evaluations += n * c
            sizes = self._sizes(chunk)
            targets = self.targets.repeat_interleave(c)
            for v, (t_smaller, t_larger) in enumerate(self.tables):
                values = target_values(logits, self._lookup(t_smaller, sizes), targets, self.output)
                smaller[v].append(values.view(n, c))
                if torch.equal(t_smaller, t_larger):
                    larger[v].append(smaller[v][-1])
                else:
                    larger[v].append(
                        target_values(logits, self._lookup(t_larger, sizes), targets, self.output).view(n, c)
                    )
        return (torch.cat([torch.cat(parts, 1) for parts in smaller]),
                torch.cat([torch.cat(parts, 1) for parts in larger]))

    def _sizes(self, chunk: Tensor) -> Tensor:
        """Table index of c coalitions for every input: kept features (n·c,), or kept informative ones (n, c)."""
        if self.informative is None:
            return chunk.sum(1).repeat(self.x.shape[0])
        return (chunk.unsqueeze(0) & self.informative.unsqueeze(1)).sum(-1)

    @staticmethod
    def _lookup(table: Tensor, sizes: Tensor) -> Tensor:
        """Temperatures (n·c,), input-major, from a (d + 1,) table or per-input (n, d + 1) tables."""
        return table[sizes] if table.ndim == 1 else table.gather(1, sizes).reshape(-1)

    def keep_rows(self, rows: Iterator[Tensor]) -> tuple[Tensor, Tensor]:
        """Values for keep rows produced lazily in chunks (bounded memory for large d)."""
        parts = [self(chunk) for chunk in rows]
        return torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1)


def draw_permutations(num_features: int, num_permutations: int) -> Tensor:
    """(P, d) permutations drawn as Captum's ShapleyValueSampling does: ``torch.randperm(d)`` each, global RNG."""
    return torch.stack([torch.randperm(num_features) for _ in range(num_permutations)])


def _shapley_sampling(evaluator: _CoalitionValues, num_permutations: int) -> Tensor:
    """Permutation sampling (baseline → input order), same permutations as Captum for the same seed."""
    d, n = evaluator.num_features, evaluator.num_rows
    perms = draw_permutations(d, num_permutations)
    ranks = perms.argsort(1)
    inner = num_permutations * (d - 1)
    # rows: the empty and the full coalition, then (permutation p, size k) for k = 1..d−1, generated lazily
    # (keep = rank < k) and evaluated in full batches of perturbations_per_eval
    step = max(evaluator.per_eval, 1)

    def rows() -> Iterator[Tensor]:
        for start in range(0, inner + 2, step):
            index = torch.arange(start, min(start + step, inner + 2))
            keep = torch.zeros(index.numel(), d, dtype=torch.bool)
            keep[index == 1] = True
            interior = index >= 2
            p, k = (index[interior] - 2) // (d - 1), (index[interior] - 2) % (d - 1) + 1
            keep[interior] = ranks[p] < k[:, None]
            yield keep

    small, large = evaluator.keep_rows(rows())
    empty_small, full_large = small[:, 0], large[:, 1]
    small = small[:, 2:].reshape(n, num_permutations, d - 1)
    large = large[:, 2:].reshape(n, num_permutations, d - 1)
    # value of the size-k coalition of each permutation, k = 0..d, in both roles
    v_small = torch.cat([empty_small[:, None, None].expand(n, num_permutations, 1), small], 2)
    v_large = torch.cat([large, full_large[:, None, None].expand(n, num_permutations, 1)], 2)
    marginals = v_large - v_small  # (n, P, d): feature perms[p, k] added at step k + 1
    index = perms.to(marginals.device).unsqueeze(0).expand(n, -1, -1)
    totals = torch.zeros(n, num_permutations, d, dtype=torch.float64, device=marginals.device)
    return totals.scatter_(2, index, marginals).mean(1)


def _shapley_exact(evaluator: _CoalitionValues, _: int) -> Tensor:
    """Exact Shapley values from all 2^d coalitions (bit j of the row index = feature j kept)."""
    d = evaluator.num_features
    num = 1 << d
    bits = 1 << torch.arange(d)
    step = max(evaluator.per_eval, 1)

    def rows() -> Iterator[Tensor]:
        for start in range(0, num, step):
            codes = torch.arange(start, min(start + step, num))
            yield (codes[:, None] & bits) > 0

    v_small, v_large = evaluator.keep_rows(rows())
    codes = torch.arange(num)
    sizes = ((codes[:, None] & bits) > 0).sum(1)
    weights = torch.tensor(
        [math.factorial(k) * math.factorial(d - k - 1) / math.factorial(d) for k in range(d)], dtype=torch.float64
    )
    without = (codes[:, None] & bits) == 0  # (2^d, d): S ∌ j
    partner = (codes[:, None] | bits).to(v_large.device)  # index of S ∪ j
    w = torch.where(without, weights[sizes.clamp(max=d - 1)][:, None], 0.0).to(v_large.device)
    contributions = v_large[:, partner] - v_small[:, :, None]  # (n, 2^d, d)
    return (contributions * w).sum(1)


def _feature_ablation(evaluator: _CoalitionValues, _: int) -> Tensor:
    """v(N) − v(N ∖ j) for each feature j."""
    d = evaluator.num_features
    keep = ~torch.eye(d, dtype=torch.bool)
    v_small, _ = evaluator(keep)
    _, full_large = evaluator(torch.ones(1, d, dtype=torch.bool))
    return full_large - v_small


_NATIVE = {
    "shapley_sampling": _shapley_sampling,
    "shapley_exact": _shapley_exact,
    "feature_ablation": _feature_ablation,
    "occlusion": _feature_ablation,
}


# ------------------------------------------------------------------------------------------- Captum
def _make_surrogate(surrogate):
    from captum._utils.models.linear_model import SkLearnLasso, SkLearnLinearRegression, SkLearnRidge

    if not isinstance(surrogate, str):
        return surrogate
    if surrogate not in SURROGATES:
        raise ValueError(f"`surrogate` must be one of {SURROGATES} or a Captum Model, got {surrogate!r}.")
    return {"ridge": lambda: SkLearnRidge(alpha=1.0), "linear": SkLearnLinearRegression,
            "lasso": lambda: SkLearnLasso(alpha=0.01)}[surrogate]()


def _captum_variants(
    method, model, inputs, targets, perturbation, calibrators, modes, output, num_samples, per_eval, surrogate, seed,
    informative=None, rule="mean",
) -> tuple[list[Tensor], int, list[float | None]]:
    """Captum once per calibrator, the model once in all: the first run records each call's logits, the next
    ones (same seed, hence the same sampled coalitions) replay them, checked against a checksum of the inputs.

    Returns the attributions per variant, the evaluations of one pass and, at the effective level
    (``informative`` given), each variant's shared temperature (see :func:`_captum_attribute_effective`)."""
    recorded: list[tuple[Tensor, Tensor]] = []
    cursor = [0]

    def recording(x: Tensor) -> Tensor:
        logits = model(x)
        recorded.append((x.double().sum(), logits))
        return logits

    def replaying(x: Tensor) -> Tensor:
        checksum, logits = recorded[cursor[0]] if cursor[0] < len(recorded) else (None, None)
        cursor[0] += 1
        if logits is None or logits.shape[0] != x.shape[0] or not torch.equal(checksum, x.double().sum()):
            raise RuntimeError("Captum drew other coalitions on replay; explain the variants separately.")
        return logits

    results, shared, evaluations = [], [], 0
    state = torch.get_rng_state() if seed is None else None
    for v, (calibrator, mode) in enumerate(zip(calibrators, modes, strict=True)):
        cursor[0] = 0
        if state is not None:
            torch.set_rng_state(state)
        source = recording if v == 0 else replaying
        with _seeded(seed), warnings.catch_warnings():
            if informative is None:
                attributions, calls = _captum_attribute(
                    method, source, inputs, targets, perturbation, calibrator, output, num_samples, per_eval,
                    surrogate,
                )
                shared.append(None)
            else:
                attributions, calls, temperature = _captum_attribute_effective(
                    method, source, inputs, targets, perturbation, calibrator, output, num_samples, per_eval,
                    surrogate, informative, mode, rule,
                )
                shared.append(temperature)
        if v == 0:
            evaluations = calls
        results.append(attributions)
    return results, evaluations, shared


def _captum_attribute(
    method, model, inputs, targets, perturbation, calibrator, output, num_samples, per_eval, surrogate
) -> tuple[Tensor, int]:
    """Captum on the keep vector (ones vs zeros, one feature per entry): exact levels by construction."""
    wrapped = RecalibratedClassifier(model, calibrator, perturbation, output=output)
    return _captum_keep_vector(method, wrapped.keep_forward, inputs, targets, perturbation, num_samples, per_eval,
                               surrogate)


def _captum_keep_vector(
    method, keep_forward, inputs, targets, perturbation, num_samples, per_eval, surrogate
) -> tuple[Tensor, int]:
    """Run Captum's ``method`` on the (n, d) keep vector of ``perturbation``; ``keep_forward(keep, x)``."""
    from captum.attr import FeatureAblation, KernelShap, Lime, ShapleyValues, ShapleyValueSampling

    counter = [0]

    def forward(keep: Tensor, x: Tensor) -> Tensor:
        counter[0] += keep.shape[0]
        return keep_forward(keep, x)

    ones = torch.ones(inputs.shape[0], perturbation.num_features, device=inputs.device, dtype=inputs.dtype)
    zeros = torch.zeros_like(ones)
    warnings.filterwarnings("ignore", message="You are providing multiple inputs for Lime")
    common = {"baselines": zeros, "target": targets, "additional_forward_args": (inputs,)}
    if method == "shapley_sampling":
        attr = ShapleyValueSampling(forward).attribute(
            ones, n_samples=num_samples, perturbations_per_eval=per_eval, **common
        )
    elif method == "shapley_exact":
        attr = ShapleyValues(forward).attribute(ones, perturbations_per_eval=per_eval, **common)
    elif method in ("feature_ablation", "occlusion"):
        attr = FeatureAblation(forward).attribute(ones, perturbations_per_eval=per_eval, **common)
    elif method == "lime":
        attr = Lime(forward, interpretable_model=surrogate).attribute(
            ones, n_samples=num_samples, perturbations_per_eval=per_eval, **common
        )
    else:
        attr = KernelShap(forward).attribute(ones, n_samples=num_samples, perturbations_per_eval=per_eval, **common)
    return attr.detach(), counter[0]


def _captum_attribute_effective(
    method, model, inputs, targets, perturbation, calibrator, output, num_samples, per_eval, surrogate,
    informative, mode, rule,
) -> tuple[Tensor, int, float | None]:
    """Captum per input over the keep vector of its m informative features, at the effective level.

    The uninformative features stay kept (they do not change the input) and get exactly 0. Consistent
    LIME/KernelSHAP score every coalition of input i at the shared temperature of the m_i-feature sampler, whose
    levels (m_i − k)/m_i are exactly λ_eff. Returns (n, d) attributions, evaluations and the shared temperature
    (the geometric mean over inputs in consistent surrogate mode, else ``None``).
    """
    n, d = inputs.shape[0], perturbation.num_features
    attributions = torch.zeros(n, d, dtype=torch.float64, device=inputs.device)
    evaluations, shared_logs = 0, []
    consistent = mode == "consistent" and method in SURROGATE_METHODS
    for i in range(n):
        features = torch.nonzero(informative[i]).flatten()
        if features.numel() == 0:
            continue  # the input equals its baseline: every coalition has the same value
        sub = Perturbation(torch.arange(features.numel()), 0.0)
        cal, local = calibrator, None
        if consistent:
            log_t = surrogate_log_temperature(calibrator, features.numel(), method, rule)
            shared_logs.append(float(log_t))
            if calibrator is not None:
                local = GlobalTemperature(calibrator.min_temperature, calibrator.max_temperature)
                local.set_log_temperatures(log_t.reshape(1), warn_on_bounds=False)
                cal = local.to(calibrator.log_temperature.device)
        wrapped = RecalibratedClassifier(model, cal, perturbation, output=output, level="effective")
        full = torch.ones(1, d, dtype=inputs.dtype, device=inputs.device)

        def reduced_model(z: Tensor, x: Tensor, features=features, full=full, wrapped=wrapped) -> Tensor:
            keep = full.expand(z.shape[0], -1).clone()
            keep[:, features.to(z.device)] = z.to(keep.dtype)
            return wrapped.keep_forward(keep, x)

        phi, count = _captum_keep_vector(method, reduced_model, inputs[i : i + 1], targets[i : i + 1], sub,
                                         num_samples, per_eval, surrogate)
        attributions[i, features.to(attributions.device)] = phi[0].double()
        evaluations += count
    shared = float(torch.tensor(shared_logs, dtype=torch.float64).mean().exp()) if shared_logs else None
    if consistent and shared is None:
        shared = 1.0
    return attributions, evaluations, shared
