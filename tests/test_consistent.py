"""Temperature-consistent attributions: null features get 0, constant temperature gives plain Shapley."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from recalx_lightning import GlobalTemperature, Perturbation, SmoothTemperature
from recalx_lightning.explain import explain, pair_temperatures, role_temperatures
from tests.helpers import null_patch_setup, steep_binned

NATIVE = ["shapley_sampling", "shapley_exact", "feature_ablation"]
# 0 up to float32 round-off: the two coalitions of a marginal may sit in different model batches, and BLAS
# results can depend on the batch composition by an ulp.
NULL_TOL = 1e-7




@pytest.mark.parametrize("rule", ["smaller", "larger", "mean"])
@pytest.mark.parametrize("method", NATIVE)
def test_null_feature_gets_exactly_zero(method, rule):
    model, x, perturbation = null_patch_setup()
    calibrator = steep_binned()
    kwargs = dict(method=method, num_samples=6, seed=0)
    consistent = explain(model, x, perturbation, calibrator, mode="consistent", consistent_temperature=rule, **kwargs)
    plain = explain(model, x, perturbation, calibrator, **kwargs)
    assert consistent.attributions[:, 0].abs().max() <= NULL_TOL
    if method != "feature_ablation":  # ablation's only switch is T(0) → T(1/d): same bin here
        assert plain.attributions[:, 0].abs().min() > 1e-4


@pytest.mark.parametrize("method", NATIVE)
def test_constant_temperature_consistent_equals_plain(method):
    model, x, perturbation = null_patch_setup()
    calibrator = GlobalTemperature()
    calibrator.set_log_temperatures(torch.tensor([0.9], dtype=torch.float64))
    kwargs = dict(method=method, num_samples=5, seed=4)
    plain = explain(model, x, perturbation, calibrator, **kwargs)
    for rule in ("smaller", "larger", "mean"):
        consistent = explain(model, x, perturbation, calibrator, mode="consistent", consistent_temperature=rule,
                             **kwargs)
        assert torch.allclose(consistent.attributions, plain.attributions, atol=1e-12, rtol=0)


@settings(max_examples=25, deadline=None)
@given(
    log_t=st.lists(st.floats(-2.0, 3.0), min_size=3, max_size=3),
    value=st.floats(-2.0, 2.0),
    seed=st.integers(0, 2**16),
)
def test_null_feature_property_random_calibrators(log_t, value, seed):
    """Tabular d = 4, feature 2 equals its (constant) baseline in every input: consistent φ_2 = 0 (round-off)."""
    calibrator = SmoothTemperature(3)
    calibrator.set_log_temperatures(torch.tensor(log_t, dtype=torch.float64), warn_on_bounds=False)
    generator = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    x = torch.randn(3, 4, generator=generator)
    x[:, 2] = value
    perturbation = Perturbation.tabular(4, baseline=value)
    for method in NATIVE:
        phi = explain(model, x, perturbation, calibrator, method=method, mode="consistent", num_samples=3, seed=seed)
        assert phi.attributions[:, 2].abs().max() <= NULL_TOL


def test_consistent_sampling_converges_to_consistent_exact():
    model, x, perturbation = null_patch_setup(1)
    calibrator = steep_binned()
    exact = explain(model, x, perturbation, calibrator, method="shapley_exact", mode="consistent")
    sampled = explain(model, x, perturbation, calibrator, mode="consistent", num_samples=300, seed=0)
    assert (sampled.attributions - exact.attributions).abs().max() < 0.03


def test_switch_part_is_shared_by_all_features():
    """Plain − consistent ≈ the same positive amount on every feature (the temperature switch)."""
    model, x, perturbation = null_patch_setup(2)
    calibrator = steep_binned()
    plain = explain(model, x, perturbation, calibrator, method="shapley_exact").attributions
    consistent = explain(model, x, perturbation, calibrator, method="shapley_exact", mode="consistent").attributions
    switch = plain - consistent
    assert torch.all(switch[:, 0] > 0)  # the null feature carries only the switch


def test_role_temperature_tables():
    calibrator = steep_binned()
    own, _ = role_temperatures(calibrator, 4)
    assert torch.allclose(own, torch.exp(torch.tensor([2.5, 2.5, 1.5, 0.7, 0.0], dtype=torch.float64)))
    smaller, larger = role_temperatures(calibrator, 4, "consistent", "mean")
    pair = pair_temperatures(own, "mean")
    assert torch.allclose(smaller[:-1], pair) and torch.allclose(larger[1:], pair)
    assert torch.allclose(pair, (own[:-1] * own[1:]).sqrt())
    assert torch.equal(pair_temperatures(own, "smaller"), own[:-1])
    assert torch.equal(pair_temperatures(own, "larger"), own[1:])
    with pytest.raises(ValueError, match="mode"):
        role_temperatures(calibrator, 4, "both")
