"""Calibrators and fit_temperatures against independent oracles (scipy's bounded 1-D search)."""

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize, minimize_scalar

from recalx_lightning import (
    BinnedTemperature,
    GlobalTemperature,
    SmoothTemperature,
    fit_temperatures,
    load_calibrator,
)
from recalx_lightning.perturbation import level_to_bin

LOG_BOUNDS = (math.log(0.05), math.log(100.0))


def synthetic(n=3000, num_classes=10, seed=0):
    """Logits whose true temperature grows with the level: labels drawn from softmax(z / (1 + 5λ))."""
    g = torch.Generator().manual_seed(seed)
    levels = torch.rand(n, generator=g, dtype=torch.float64)
    logits = torch.randn(n, num_classes, generator=g, dtype=torch.float64) * 3
    probs = (logits / (1 + 5 * levels)[:, None]).softmax(1)
    labels = torch.multinomial(probs, 1, generator=g).squeeze(1)
    return logits.float(), labels, levels


def scipy_log_temperature(logits, labels):
    def objective(log_t):
        return F.cross_entropy(logits.double() / math.exp(log_t), labels).item()

    return minimize_scalar(objective, bounds=LOG_BOUNDS, method="bounded", options={"xatol": 1e-10}).x


@pytest.mark.parametrize("method", ["newton", "lbfgs"])
def test_binned_fit_equals_each_bins_1d_optimum(method):
    logits, labels, levels = synthetic()
    calibrator, diagnostics = fit_temperatures(logits, labels, levels, "binned", method=method)
    bins = level_to_bin(levels, 10)
    for b in range(10):
        expected = scipy_log_temperature(logits[bins == b], labels[bins == b])
        assert abs(calibrator.log_temperature[b].item() - expected) < 1e-4
    assert diagnostics.converged and diagnostics.method == method
    assert sum(diagnostics.samples_per_bin) == len(labels)
    assert all(after <= before for before, after in zip(diagnostics.loss_before, diagnostics.loss_after))
    assert calibrator.temperatures[9] > calibrator.temperatures[0]


def test_global_fit_equals_1d_optimum():
    logits, labels, levels = synthetic(n=1000)
    calibrator, diagnostics = fit_temperatures(logits, labels, levels, "global")
    assert isinstance(calibrator, GlobalTemperature) and diagnostics.samples_per_bin == [1000]
    assert abs(calibrator.log_temperature.item() - scipy_log_temperature(logits, labels)) < 1e-4


def test_smooth_fit_is_the_joint_optimum():
    logits, labels, levels = synthetic(n=2000)
    calibrator, diagnostics = fit_temperatures(logits, labels, levels, "smooth", num_bins=5)
    bins = level_to_bin(levels, 5)
    weights = 1.0 / torch.bincount(bins, minlength=5).double()[bins]
    z, y = logits.double(), labels

    def objective(theta):
        log_t = SmoothTemperature(5).log_temperature_at(levels, torch.tensor(theta))
        ce = F.cross_entropy(z / log_t.exp()[:, None], y, reduction="none")
        return float((ce * weights).sum())

    reference = minimize(objective, np.zeros(5), method="Nelder-Mead", options={"xatol": 1e-8, "fatol": 1e-12,
                                                                                 "maxiter": 20000})
    assert np.allclose(calibrator.log_temperature.detach().numpy(), reference.x, atol=1e-3)
    assert objective(calibrator.log_temperature.detach().numpy()) <= reference.fun + 1e-9
    assert diagnostics.converged and diagnostics.method == "newton+lbfgs"


def test_smooth_temperature_is_continuous_and_interpolates_centres():
    calibrator = SmoothTemperature(4)
    calibrator.set_log_temperatures(torch.tensor([0.0, 1.0, 2.0, 4.0]))
    centres = torch.tensor([0.125, 0.375, 0.625, 0.875], dtype=torch.float64)
    assert torch.allclose(calibrator.log_temperature_at(centres), torch.tensor([0.0, 1.0, 2.0, 4.0],
                                                                                dtype=torch.float64))
    assert calibrator.log_temperature_at(torch.tensor([0.25], dtype=torch.float64)).item() == pytest.approx(0.5)
    assert calibrator.log_temperature_at(torch.tensor([0.0, 1.0], dtype=torch.float64)).tolist() == [0.0, 4.0]
    grid = torch.linspace(0, 1, 10001, dtype=torch.float64)
    assert calibrator.log_temperature_at(grid).diff().abs().max() < 1e-3  # no jumps


def test_binned_uses_floor_bins():
    calibrator = BinnedTemperature(10)
    calibrator.set_log_temperatures(torch.arange(10, dtype=torch.float64) / 10)
    levels = torch.tensor([0.0, 0.0999, 0.1, 0.95, 1.0], dtype=torch.float64)
    assert torch.allclose(calibrator.log_temperature_at(levels), torch.tensor([0.0, 0.0, 0.1, 0.9, 0.9],
                                                                               dtype=torch.float64))


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    num_classes=st.integers(2, 50),
    kind=st.sampled_from(["binned", "smooth", "global"]),
)
def test_argmax_invariance(seed, num_classes, kind):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(64, num_classes, generator=g) * 10
    levels = torch.rand(64, generator=g, dtype=torch.float64)
    calibrator = {"binned": BinnedTemperature(), "smooth": SmoothTemperature(), "global": GlobalTemperature()}[kind]
    calibrator.set_log_temperatures(
        torch.empty(calibrator.num_bins, dtype=torch.float64).uniform_(-2.9, 4.6, generator=g)
    )
    scaled = calibrator(logits, levels)
    assert torch.equal(scaled.argmax(1), logits.argmax(1))
    assert torch.equal(scaled.softmax(1).argmax(1), logits.argmax(1))


def test_save_and_load_roundtrip(tmp_path):
    for calibrator in (BinnedTemperature(7, max_temperature=50), SmoothTemperature(3), GlobalTemperature()):
        calibrator.set_log_temperatures(torch.linspace(-1, 2, calibrator.num_bins, dtype=torch.float64))
        loaded = load_calibrator(calibrator.save(tmp_path / f"{calibrator.kind}.pt"))
        assert type(loaded) is type(calibrator) and torch.equal(loaded.temperatures, calibrator.temperatures)
        assert loaded.max_temperature == calibrator.max_temperature
        levels = torch.rand(20, dtype=torch.float64)
        logits = torch.randn(20, 4)
        assert torch.equal(loaded(logits, levels), calibrator(logits, levels))


def test_empty_bin_takes_nearest_non_empty_bin():
    logits, labels, levels = synthetic(n=2000)
    keep = (levels < 0.3) | (levels >= 0.5)  # bins 3 and 4 empty
    with pytest.warns(UserWarning, match=r"bins \[3, 4\] have no calibration samples"):
        calibrator, diagnostics = fit_temperatures(logits[keep], labels[keep], levels[keep], "binned")
    t = calibrator.temperatures
    assert diagnostics.empty_bins == [3, 4] and math.isnan(diagnostics.loss_after[3])
    assert t[3] == t[2] and t[4] == t[5]


def test_sparse_bin_warns_and_bound_hit_names_the_bin():
    logits, labels, levels = synthetic(n=2000)
    with pytest.warns(UserWarning, match=r"bins \[0\] have fewer than 30"):
        fit_temperatures(logits[levels >= 0.095], labels[levels >= 0.095], levels[levels >= 0.095], "binned")
    # a perfectly separated bin drives T to the lower bound
    perfect = torch.zeros(100, 3)
    perfect[torch.arange(100), torch.arange(100) % 3] = 5.0
    with pytest.warns(UserWarning, match=r"bin 0: T = 0.05"):
        calibrator, diagnostics = fit_temperatures(perfect, torch.arange(100) % 3, None, "global")
    assert diagnostics.bound_hits == [0] and calibrator.temperatures.item() == pytest.approx(0.05)
    # anti-informative logits drive T to the upper bound (β → 0), never negative
    with pytest.warns(UserWarning, match="bin 0: T = 100"):
        calibrator, _ = fit_temperatures(-perfect, torch.arange(100) % 3, None, "global")
    assert calibrator.temperatures.item() == pytest.approx(100.0)


def test_bad_inputs_are_named():
    logits, labels, levels = synthetic(n=50)
    nan_logits = logits.clone()
    nan_logits[3, 1] = float("nan")
    nan_logits[7, 0] = float("inf")
    with pytest.raises(ValueError, match=r"`logits` contains 2 non-finite values .* \[\[3, 1\], \[7, 0\]\]"):
        fit_temperatures(nan_logits, labels, levels)
    with pytest.raises(ValueError, match=r"`labels` must lie in \[0, 10\)"):
        fit_temperatures(logits, labels + 10, levels)
    with pytest.raises(ValueError, match=r"`labels` must have shape \(50,\)"):
        fit_temperatures(logits, labels[:-1], levels)
    with pytest.raises(ValueError, match=r"`levels` must have shape \(50,\)"):
        fit_temperatures(logits, labels, levels[:-1])
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        fit_temperatures(logits, labels, levels + 1)
    with pytest.raises(ValueError, match="num_bins"):
        fit_temperatures(logits, labels, levels, num_bins=0)
    with pytest.raises(ValueError, match="min_temperature < max_temperature"):
        BinnedTemperature(min_temperature=2.0, max_temperature=1.0)
    with pytest.raises(ValueError, match="K >= 2"):
        fit_temperatures(logits[:, :1], labels * 0, levels)
    with pytest.raises(ValueError, match="empty"):
        fit_temperatures(logits[:0], labels[:0], levels[:0])
    with pytest.raises(ValueError, match="method='newton' needs"):
        fit_temperatures(logits, labels, levels, "smooth", method="newton")
    with pytest.warns(UserWarning, match="looks like probabilities"), warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        fit_temperatures(logits.softmax(1), labels, levels, "global")


def test_apply_temperature_divides_each_row_or_all_rows():
    from recalx_lightning.calibrators import apply_temperature

    logits = torch.randn(4, 3)
    rows = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=torch.float64)
    expected = torch.stack([logits[i].double() / rows[i] for i in range(4)])
    assert torch.equal(apply_temperature(logits, rows), expected)  # float64 temperatures promote
    assert torch.equal(apply_temperature(logits, 2.0), logits / 2.0)
    calibrator = BinnedTemperature(num_bins=2)
    calibrator.set_log_temperatures(torch.tensor([0.3, -0.2]))
    levels = torch.tensor([0.1, 0.9, 0.2, 0.7], dtype=torch.float64)
    naive = logits / calibrator.temperatures[[0, 1, 0, 1]].float()[:, None]
    torch.testing.assert_close(calibrator(logits, levels), naive, rtol=0, atol=0)
