"""Numerical robustness of temperature fitting as a property over random problems."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recalx_lightning.calibrators import make_calibrator
from recalx_lightning.fitting import fit_temperatures


def random_problem(seed: int, n: int, num_classes: int, scale: float, noise: float, dtype: torch.dtype):
    """Logits of an informative model at ``scale``, labels its argmax flipped to random with prob. ``noise``."""
    g = torch.Generator().manual_seed(seed)
    levels = torch.rand(n, generator=g, dtype=torch.float64)
    signal = torch.randn(n, num_classes, generator=g) * scale
    labels = signal.argmax(1)
    flip = torch.rand(n, generator=g) < noise
    labels = torch.where(flip, torch.randint(0, num_classes, (n,), generator=g), labels)
    logits = (signal * (1 - levels[:, None].float())).to(dtype)
    return logits, labels, levels


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 160),
    num_classes=st.integers(2, 40),
    log10_scale=st.floats(-2, 2.5),
    noise=st.floats(0, 1),
    num_bins=st.integers(1, 12),
    kind=st.sampled_from(["binned", "smooth", "global"]),
    method=st.sampled_from(["auto", "lbfgs"]),
    dtype=st.sampled_from([torch.float16, torch.float32, torch.float64]),
)
def test_fit_is_finite_bounded_argmax_preserving_and_honest(
    seed, n, num_classes, log10_scale, noise, num_bins, kind, method, dtype
):
    logits, labels, levels = random_problem(seed, n, num_classes, 10**log10_scale, noise, dtype)
    calibrator = make_calibrator(kind, num_bins=num_bins, min_temperature=0.05, max_temperature=100.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, diagnostics = fit_temperatures(logits, labels, levels, calibrator, method=method, min_samples_per_bin=1)
    temperatures = calibrator.temperatures
    assert torch.isfinite(temperatures).all()
    assert (temperatures >= 0.05 * (1 - 1e-12)).all() and (temperatures <= 100.0 * (1 + 1e-12)).all()
    scaled = calibrator(logits.double(), levels)
    assert torch.isfinite(scaled).all()
    assert torch.equal(scaled.argmax(1), logits.double().argmax(1))
    fitted = [v for v in diagnostics.loss_after if not math.isnan(v)]
    assert all(math.isfinite(v) for v in fitted)
    if calibrator.separable:  # each bin's loss is minimised on its own: never worse than T = 1
        for before, after in zip(diagnostics.loss_before, diagnostics.loss_after):
            assert math.isnan(after) or after <= before + 1e-9
    not_converged = [w for w in caught if "did not converge" in str(w.message)]
    assert bool(not_converged) == (not diagnostics.converged)
    if method == "lbfgs" and calibrator.separable and diagnostics.converged:  # converged means at the optimum
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exact = fit_temperatures(logits, labels, levels, kind, num_bins=num_bins, method="newton",
                                     min_samples_per_bin=1).diagnostics
        for found, best in zip(diagnostics.loss_after, exact.loss_after):
            assert math.isnan(best) or found <= best + 1e-6 * max(1.0, abs(best))


def test_smooth_fit_that_once_returned_nan_is_finite_and_converged():
    g = torch.Generator().manual_seed(4)
    logits, labels = torch.randn(51, 27, generator=g), torch.randint(0, 27, (51,), generator=g)
    levels = torch.rand(51, generator=g, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sparse bins and bound hits are expected on pure-noise labels
        calibrator, diagnostics = fit_temperatures(logits, labels, levels, "smooth", num_bins=9)
    assert torch.isfinite(calibrator.temperatures).all() and diagnostics.converged


def test_non_convergence_warns_and_is_reported():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(400, 10, generator=g) * 3, torch.randint(0, 10, (400,), generator=g)
    levels = torch.rand(400, generator=g, dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"SmoothTemperature fit \(lbfgs\) did not converge \(max_iter=1"):
        _, diagnostics = fit_temperatures(logits, labels, levels, "smooth", method="lbfgs", max_iter=1)
    assert not diagnostics.converged
