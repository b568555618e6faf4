"""Fitting temperatures on cached logits (no model in the loop).

The objective (ReCalX, Decker et al. 2025) is the cross-entropy of the scaled logits, each level bin weighing
equally::

    L(θ) = Σ_b  mean_{i ∈ bin b}  CE(z_i / T(λ_i), y_i),        T(λ) = exp(θ(λ))

For piecewise-constant calibrators (binned, global) it separates into one problem per bin, each convex in the
inverse temperature β = 1/T::

    L_b(β)   = mean_i [logsumexp(β z_i) − β z_{i,y_i}]
    L_b'(β)  = mean_i [E_{softmax(β z_i)}[z_i] − z_{i,y_i}]
    L_b''(β) = mean_i Var_{softmax(β z_i)}[z_i] ≥ 0

``method="newton"`` solves L_b'(β) = 0 by Newton's method safeguarded with a bracket inside the temperature
bounds (one pass over the logits per iteration, quadratic convergence, bounds exact).
``method="lbfgs"`` is the paper's optimiser, kept inside the bounds: L-BFGS-B on θ = log T ∈ [log T_min, log T_max],
jointly over bins (and the only one for :class:`~recalx_lightning.calibrators.SmoothTemperature`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from recalx_lightning._checks import check_labels, check_levels, check_logits, check_positive_int
from recalx_lightning.calibrators import TemperatureCalibrator, make_calibrator
from recalx_lightning.perturbation import level_to_bin

FitMethod = Literal["auto", "newton", "lbfgs"]


@dataclass
class FitDiagnostics:
    """What happened in :func:`fit_temperatures`; one entry per bin in the list fields.

    ``loss_before`` is the mean cross-entropy at T = 1, ``loss_after`` at the fitted temperature (NaN for an
    empty bin). ``iterations`` counts passes over the logits (Newton) or objective evaluations (L-BFGS).
    """

    method: str
    samples_per_bin: list[int]
    loss_before: list[float]
    loss_after: list[float]
    temperatures: list[float]
    iterations: int
    converged: bool
    bound_hits: list[int] = field(default_factory=list)
    empty_bins: list[int] = field(default_factory=list)
    sparse_bins: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class FitResult(NamedTuple):
    calibrator: TemperatureCalibrator
    diagnostics: FitDiagnostics


def fit_temperatures(
    logits: Tensor,
    labels: Tensor,
    levels: Tensor | None = None,
    calibrator: TemperatureCalibrator | str = "binned",
    *,
    num_bins: int = 10,
    method: FitMethod = "auto",
    max_iter: int = 100,
    tolerance: float = 1e-10,
    min_samples_per_bin: int = 30,
    chunk_size: int = 4096,
) -> FitResult:
    """Fit a calibrator's temperatures by minimising cross-entropy on cached logits, in float64.

    Args:
        logits: (n, K) pre-softmax outputs of the frozen model on perturbed inputs.
        labels: (n,) true classes in [0, K).
        levels: (n,) perturbation levels λ in [0, 1]; ``None`` means all 0 (classic temperature scaling).
        calibrator: an instance (fitted in place, its bounds used) or ``"binned"``, ``"smooth"``, ``"global"``.
        num_bins: B when ``calibrator`` is a name.
        method: ``"newton"`` (exact, bracketed; binned/global), ``"lbfgs"`` (the paper's, any calibrator) or
            ``"auto"`` (Newton where possible; for smooth, L-BFGS started from the binned Newton solution).
        max_iter: iteration cap of the solver.
        tolerance: stop when |β·L_b'(β)| (Newton) or the projected gradient in θ (L-BFGS-B) falls below it;
            a number in (0, 1). A fit that stops short warns and reports ``converged=False``.
        min_samples_per_bin: warn for bins with fewer samples (their temperature is noisy).
        chunk_size: rows per block, which bounds temporary memory to ~3 · chunk_size · K floats.

    Returns:
        ``(calibrator, diagnostics)`` — see :class:`FitDiagnostics`.

    Empty bins: a bin without samples gets the temperature of the nearest non-empty bin (ties: the lower
    level), with a warning. For the smooth calibrator, a centre that no sample constrains keeps that value.
    """
    if isinstance(calibrator, str):
        calibrator = make_calibrator(calibrator, num_bins=num_bins)
    _check_fit_options(method, max_iter, calibrator, tolerance)
    objective = CachedObjective(logits, labels, levels, calibrator, chunk_size)
    return objective.fit(method, max_iter=max_iter, tolerance=tolerance, min_samples_per_bin=min_samples_per_bin)


class _Problem:
    """Centred float64 logits and per-sample bookkeeping shared by both solvers."""

    def __init__(self, logits, labels, levels, calibrator, chunk_size, device) -> None:
        z = logits.detach().to(device=device, dtype=torch.float64)
        z = z - z.max(dim=1, keepdim=True).values
        self.z = z
        self.levels = levels.detach().to(device=device, dtype=torch.float64)
        self.target = z.gather(1, labels.detach().to(device).long()[:, None]).squeeze(1)
        self.chunk_size = chunk_size
        self.report_bins = (
            calibrator.group_index(self.levels) if calibrator.separable
            else level_to_bin(self.levels, calibrator.num_bins)
        )
        self.bin_sizes = torch.bincount(self.report_bins, minlength=calibrator.num_bins).double()

    def expand(self, theta: Tensor, calibrator: TemperatureCalibrator) -> Tensor:
        """Per-sample log-temperatures (n,) from θ (num_bins,), through the calibrator's own map."""
        with torch.no_grad():
            return calibrator.log_temperature_at(self.levels, theta.to(self.z.device)).detach()

    def moments(self, beta: Tensor, with_derivatives: bool = True) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Per-sample CE, dCE/dβ and d²CE/dβ² at per-sample inverse temperatures β (n,)."""
        losses, firsts, seconds = [], [], []
        for start in range(0, self.z.shape[0], self.chunk_size):
            z = self.z[start : start + self.chunk_size]
            b = beta[start : start + self.chunk_size, None]
            e = torch.exp(z * b)
            s0 = e.sum(1)
            target = self.target[start : start + self.chunk_size]
            losses.append(s0.log() - b.squeeze(1) * target)
            if with_derivatives:
                ez = e.mul_(z)
                mean = ez.sum(1) / s0
                second = torch.linalg.vecdot(ez, z) / s0 - mean**2
                firsts.append(mean - target)
                seconds.append(second.clamp_min(0))
        if not with_derivatives:
            return torch.cat(losses), None, None
        return torch.cat(losses), torch.cat(firsts), torch.cat(seconds)

    def bin_mean(self, per_sample: Tensor, bins: Tensor | None = None, size: int | None = None) -> Tensor:
        bins = self.report_bins if bins is None else bins
        size = self.bin_sizes.numel() if size is None else size
        sums = torch.zeros(size, dtype=torch.float64, device=per_sample.device).index_add_(0, bins, per_sample)
        counts = torch.bincount(bins, minlength=size).double()
        return sums / counts  # NaN for empty bins

    def bin_losses(self, log_temperature: Tensor) -> Tensor:
        losses, _, _ = self.moments(torch.exp(-log_temperature), with_derivatives=False)
        return self.bin_mean(losses).cpu()


def _newton(problem: _Problem, calibrator: TemperatureCalibrator, max_iter: int, tolerance: float):
    """Bracketed Newton on each group's β; returns θ = −log β, passes, converged.

    Stops per group when the Newton step is below ``tolerance`` relative to β, or at a bound the gradient points
    through. If the second iterate is still on the starting side of the optimum, the bound on that side is
    tried next: in the exponential tail of a (nearly) separable bin Newton steps have constant size.
    """
    groups = calibrator.group_index(problem.levels) if calibrator.separable else problem.report_bins
    size = calibrator.num_bins
    options = {"dtype": torch.float64, "device": problem.z.device}
    beta_low = torch.full((size,), 1.0 / calibrator.max_temperature, **options)
    beta_high = torch.full((size,), 1.0 / calibrator.min_temperature, **options)
    low, high = beta_low.clone(), beta_high.clone()
    beta = torch.ones(size, **options).clamp(beta_low, beta_high)
    done = torch.bincount(groups, minlength=size) == 0
    tried_low = torch.zeros(size, dtype=torch.bool, device=beta.device)
    tried_high = torch.zeros_like(tried_low)
    first_sign = torch.zeros(size, **options)
    iterations = 0
    for iterations in range(1, max_iter + 1):  # noqa: B007
        _, first, second = problem.moments(beta[groups])
        grad = problem.bin_mean(first, groups, size)
        newton = grad / problem.bin_mean(second, groups, size).clamp_min(1e-300)
        tried_low |= beta <= beta_low
        tried_high |= beta >= beta_high
        at_bound = ((beta >= beta_high) & (grad <= 0)) | ((beta <= beta_low) & (grad >= 0))
        done |= at_bound | (grad == 0) | (newton.abs() <= tolerance * beta) | ((high - low) <= 1e-13 * high)
        if bool(done.all()):
            break
        low = torch.where(grad < 0, torch.maximum(low, beta), low)
        high = torch.where(grad > 0, torch.minimum(high, beta), high)
        if iterations == 1:
            first_sign = grad.sign()
        step = beta - newton
        outside = ~(step > low) | ~(step < high)
        stalled = (iterations >= 2) & (grad.sign() == first_sign)
        untried = torch.where(grad < 0, ~tried_high, ~tried_low)
        toward_bound = torch.where(grad < 0, beta_high, beta_low)
        step = torch.where(outside, torch.sqrt(low * high), step)
        step = torch.where((outside | stalled) & untried, toward_bound, step)
        beta = torch.where(done, beta, step)
    return -beta.log(), iterations, bool(done.all())


def check_fit_method(method: str, name: str = "method") -> None:
    """The one check of a solver name (``name`` is the option the user set: ``method`` or ``fit_method``)."""
    if method not in ("auto", "newton", "lbfgs"):
        raise ValueError(f"`{name}` must be 'auto', 'newton' or 'lbfgs', got {method!r}.")


def _check_fit_options(method: str, max_iter: int, calibrator: TemperatureCalibrator,
                       tolerance: float = 1e-10) -> None:
    check_fit_method(method)
    check_positive_int(max_iter, "max_iter")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 < tolerance < 1:
        raise ValueError(
            f"`tolerance` must be a number in (0, 1) (the solver's stopping threshold, default 1e-10), "
            f"got {tolerance!r}."
        )
    if method == "newton" and not calibrator.separable:
        raise ValueError(f"method='newton' needs a piecewise-constant calibrator; use 'lbfgs' for {calibrator.kind}.")


class CachedObjective:
    """The fitting objective Σ_b mean_{i ∈ b} CE(z_i / T(λ_i), y_i) on cached logits, differentiable in θ.

    Holds one centred float64 copy of the logits. ``objective()`` uses the calibrator's own parameters (for an
    external optimiser, e.g. Lightning's); ``objective(theta)`` evaluates another θ (num_bins,);
    :meth:`fit` solves it (what :func:`fit_temperatures` does).
    """

    def __init__(self, logits: Tensor, labels: Tensor, levels: Tensor | None, calibrator: TemperatureCalibrator,
                 chunk_size: int = 4096) -> None:
        check_logits(logits)
        n, num_classes = logits.shape
        if n == 0:
            raise ValueError("`logits` is empty: fitting temperatures needs at least one calibration sample.")
        check_labels(labels, num_classes, n)
        levels = torch.zeros(n, dtype=torch.float64) if levels is None else levels
        check_levels(levels, n)
        check_positive_int(chunk_size, "chunk_size")
        device = calibrator.log_temperature.device
        with torch.inference_mode(False), torch.no_grad():
            self.problem = _Problem(logits, labels, levels, calibrator, chunk_size, device)
            self.weights = 1.0 / self.problem.bin_sizes[self.problem.report_bins]
        self.calibrator = calibrator

    def __call__(self, theta: Tensor | None = None) -> Tensor:
        problem = self.problem
        beta = torch.exp(-self.calibrator.log_temperature_at(problem.levels, theta))
        per_sample = torch.logsumexp(problem.z * beta[:, None], 1) - beta * problem.target
        return (per_sample * self.weights).sum()

    def fit(
        self,
        method: FitMethod = "auto",
        max_iter: int = 100,
        tolerance: float = 1e-10,
        min_samples_per_bin: int = 30,
    ) -> FitResult:
        """Fit the calibrator in place (see :func:`fit_temperatures` for the arguments and empty bins)."""
        calibrator, problem = self.calibrator, self.problem
        _check_fit_options(method, max_iter, calibrator, tolerance)
        report_bins = problem.report_bins
        counts = torch.bincount(report_bins, minlength=calibrator.num_bins)
        empty = [b for b, c in enumerate(counts.tolist()) if c == 0]
        if len(empty) == calibrator.num_bins:
            raise ValueError("no calibration samples fell into any bin.")
        sparse = [b for b, c in enumerate(counts.tolist()) if 0 < c < min_samples_per_bin]
        if sparse:
            warnings.warn(
                f"bins {sparse} have fewer than {min_samples_per_bin} calibration samples "
                f"({[int(counts[b]) for b in sparse]}); their temperatures are noisy. Raise the number of "
                "calibration samples per bin.",
                UserWarning,
                stacklevel=3,
            )
        if empty:
            warnings.warn(
                f"bins {empty} have no calibration samples; they take the temperature of the nearest non-empty bin.",
                UserWarning,
                stacklevel=3,
            )

        unit = torch.zeros(calibrator.num_bins, dtype=torch.float64, device=problem.z.device)
        loss_before = problem.bin_losses(problem.expand(unit, calibrator))
        use_newton = method == "newton" or (method == "auto" and calibrator.separable)
        if use_newton or (method == "auto" and not calibrator.separable):
            theta, iterations, converged = _newton(problem, calibrator, max_iter, tolerance)
            theta = _fill_empty(theta, counts)
            name = "newton"
        if not use_newton:
            start = theta if method == "auto" else unit
            theta, evaluations, converged = _lbfgs(self, start, max_iter, tolerance)
            iterations = evaluations + (iterations if method == "auto" else 0)
            name = "lbfgs" if method == "lbfgs" else "newton+lbfgs"

        if not converged:
            warnings.warn(
                f"{type(calibrator).__name__} fit ({name}) did not converge (max_iter={max_iter}, tolerance="
                f"{tolerance:g}); its temperatures may be off the optimum. Raise `max_iter` or check the diagnostics.",
                UserWarning,
                stacklevel=3,
            )
        baseline_bins = report_bins[problem.levels >= 1.0 - 1e-9].unique().tolist()
        hits = calibrator.set_log_temperatures(theta, baseline_bins=baseline_bins)
        loss_after = problem.bin_losses(problem.expand(calibrator.log_temperature.detach(), calibrator))
        diagnostics = FitDiagnostics(
            method=name,
            samples_per_bin=counts.tolist(),
            loss_before=loss_before.tolist(),
            loss_after=loss_after.tolist(),
            temperatures=calibrator.temperatures.tolist(),
            iterations=int(iterations),
            converged=bool(converged),
            bound_hits=hits,
            empty_bins=empty,
            sparse_bins=sparse,
        )
        return FitResult(calibrator, diagnostics)


def _lbfgs(objective: CachedObjective, start: Tensor, max_iter: int, tolerance: float):
    """The paper's optimiser, bounded: L-BFGS-B on θ inside [log T_min, log T_max], jointly over bins.

    The box keeps every iterate finite: unconstrained, a bin whose optimum is T → ∞ (or 0) walks θ off until
    exp overflows and the interpolated θ of the smooth calibrator becomes NaN. Returns θ, objective
    evaluations and whether the projected gradient fell below ``max(tolerance, 1e-7)``.
    """
    from scipy.optimize import minimize

    calibrator = objective.calibrator
    low, high = math.log(calibrator.min_temperature), math.log(calibrator.max_temperature)
    device = start.device
    evaluations = 0

    def value_and_grad(values):
        nonlocal evaluations
        evaluations += 1
        with torch.inference_mode(False), torch.enable_grad():
            theta = torch.as_tensor(values, dtype=torch.float64, device=device).requires_grad_(True)
            loss = objective(theta)
            (grad,) = torch.autograd.grad(loss, theta)
        return float(loss.detach()), grad.detach().cpu().numpy()

    x0 = start.detach().to(torch.float64).clamp(low, high).cpu().numpy()
    result = minimize(
        value_and_grad, x0, jac=True, method="L-BFGS-B", bounds=[(low, high)] * x0.size,
        options={"maxiter": max_iter, "maxfun": max_iter * 5, "gtol": tolerance, "ftol": 1e-15, "maxcor": 20},
    )
    theta = torch.as_tensor(result.x, dtype=torch.float64, device=device).clamp(low, high)
    _, grad = value_and_grad(result.x)
    grad = torch.as_tensor(grad, dtype=torch.float64)
    at_low, at_high = theta.cpu() <= low + 1e-12, theta.cpu() >= high - 1e-12
    projected = torch.where((at_low & (grad > 0)) | (at_high & (grad < 0)), torch.zeros_like(grad), grad)
    grad_max = float(projected.abs().max())
    converged = math.isfinite(grad_max) and grad_max <= max(tolerance, 1e-7) and bool(torch.isfinite(theta).all())
    return theta, evaluations, converged


def _fill_empty(theta: Tensor, counts: Tensor) -> Tensor:
    """Give each empty bin the θ of the nearest non-empty bin (ties: the lower bin)."""
    filled = theta.clone()
    present = torch.nonzero(counts > 0).flatten()
    for b in torch.nonzero(counts == 0).flatten().tolist():
        nearest = present[(present - b).abs().argmin()]
        filled[b] = theta[nearest]
    return filled
