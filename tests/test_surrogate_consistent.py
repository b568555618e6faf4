"""Consistent LIME/KernelSHAP: every sampled coalition at one shared temperature T* (issue 6, part 2)."""

import math
import warnings

import pytest
import torch
from torch import nn

from recalx_lightning import BinnedTemperature, GlobalTemperature, SmoothTemperature
from recalx_lightning.explain import explain, surrogate_size_weights, surrogate_temperature
from tests.helpers import null_patch_setup, steep_binned

METHODS = ["lime", "kernel_shap"]
RULES = ["smaller", "mean", "larger"]




def _captum_reference(method, model, x, perturbation, temperature_of_size, target, seed, num_samples):
    """Captum's Lime (ridge) / KernelShap on the keep vector, one input after another, hand-written forward."""
    from captum._utils.models.linear_model import SkLearnRidge
    from captum.attr import KernelShap, Lime

    d = perturbation.num_features
    rows = []
    torch.manual_seed(seed)
    for i in range(x.shape[0]):
        xi = x[i : i + 1]

        def forward(keep, xi=xi):
            logits = model(perturbation.apply(xi.expand(keep.shape[0], *xi.shape[1:]), keep))
            sizes = keep.sum(1).long().tolist()
            temps = torch.tensor([temperature_of_size(k, d) for k in sizes], dtype=torch.float64)
            return (logits / temps.to(logits.dtype)[:, None]).softmax(-1)

        explainer = (
            Lime(forward, interpretable_model=SkLearnRidge(alpha=1.0)) if method == "lime" else KernelShap(forward)
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rows.append(
                explainer.attribute(
                    torch.ones(1, d),
                    baselines=torch.zeros(1, d),
                    target=int(target[i]),
                    n_samples=num_samples,
                    perturbations_per_eval=64,
                )
            )
    return torch.cat(rows).double()


def _hand_shared_temperature(calibrator, d, method, rule):
    """T* by explicit sums: weights q(k) (sampling × sample weight) restricted by the rule, geometric mean."""
    log_t, total = 0.0, 0.0
    for k in range(d + 1):
        if method == "lime":
            q = math.comb(d, k) / 2**d * math.exp(-((1 - math.sqrt(k / d)) ** 2) / 2)
        else:
            q = 0.0 if k in (0, d) else 1.0 / (k * (d - k))
        w = {"mean": q, "smaller": q * (d - k), "larger": q * k}[rule]
        level = torch.tensor([(d - k) / d], dtype=torch.float64)
        log_t += w * float(calibrator.log_temperature_at(level).detach())
        total += w
    return math.exp(log_t / total)


@pytest.mark.parametrize("method", METHODS)
def test_plain_reproduces_captum_same_seed(method):
    model, x, perturbation = null_patch_setup()
    calibrator = steep_binned()
    target = torch.tensor([1, 3])

    def own(k, d):
        return float(calibrator.temperature(torch.tensor([(d - k) / d], dtype=torch.float64)))

    ours = explain(model, x, perturbation, calibrator, target, method=method, num_samples=60, seed=7)
    reference = _captum_reference(method, model, x, perturbation, own, target, seed=7, num_samples=60)
    assert torch.equal(ours.attributions, reference)
    assert ours.shared_temperature is None


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("method", METHODS)
def test_consistent_is_captum_at_one_shared_temperature(method, rule):
    model, x, perturbation = null_patch_setup(1)
    calibrator = steep_binned()
    target = torch.tensor([0, 2])
    t_star = _hand_shared_temperature(calibrator, 4, method, rule)
    assert surrogate_temperature(calibrator, 4, method, rule) == pytest.approx(t_star, rel=1e-12)
    ours = explain(
        model,
        x,
        perturbation,
        calibrator,
        target,
        method=method,
        mode="consistent",
        consistent_temperature=rule,
        num_samples=60,
        seed=3,
    )
    assert ours.shared_temperature == pytest.approx(t_star, rel=1e-12)
    reference = _captum_reference(method, model, x, perturbation, lambda k, d: t_star, target, seed=3, num_samples=60)
    assert torch.allclose(ours.attributions, reference, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_constant_temperature_consistent_equals_plain_exactly(method):
    model, x, perturbation = null_patch_setup(2)
    global_t = GlobalTemperature()
    global_t.set_log_temperatures(torch.tensor([0.9], dtype=torch.float64))
    flat_binned = BinnedTemperature(5)
    flat_binned.set_log_temperatures(torch.full((5,), -0.3, dtype=torch.float64))
    for calibrator in (global_t, flat_binned, None):
        plain = explain(model, x, perturbation, calibrator, method=method, num_samples=40, seed=5)
        for rule in RULES:
            consistent = explain(
                model,
                x,
                perturbation,
                calibrator,
                method=method,
                mode="consistent",
                consistent_temperature=rule,
                num_samples=40,
                seed=5,
            )
            assert torch.equal(consistent.attributions, plain.attributions)


@pytest.mark.parametrize("method", METHODS)
def test_null_feature_near_zero_in_consistent_mode(method):
    """Patch 0 equals the baseline: plain gives it a share of the level trend, consistent (near) 0.

    Not exactly 0: with finite samples the regression's null coefficient picks up the interactions of the other
    features by chance (measured ≤ 2e-4 here against 2e-3 – 3e-2 in plain mode).
    """
    plain_null, consistent_null = [], []
    calibrator = steep_binned()
    for seed in range(3):
        model, x, perturbation = null_patch_setup(seed, n=3)
        kwargs = dict(method=method, num_samples=100, seed=seed)
        plain_null.append(explain(model, x, perturbation, calibrator, **kwargs).attributions[:, 0].abs())
        consistent_null.append(
            explain(model, x, perturbation, calibrator, mode="consistent", **kwargs).attributions[:, 0].abs()
        )
    plain_null, consistent_null = torch.cat(plain_null), torch.cat(consistent_null)
    assert consistent_null.max() < 1e-3
    assert consistent_null.mean() < 0.05 * plain_null.mean()
    assert plain_null.min() > 1e-3


def test_consistent_kernel_shap_converges_to_shapley_at_shared_temperature():
    """KernelSHAP on the game S ↦ g(f(x_S)/T*) estimates its Shapley values: compare with exact enumeration."""
    model, x, perturbation = null_patch_setup(3, n=1)
    calibrator = SmoothTemperature(4)
    calibrator.set_log_temperatures(torch.tensor([0.2, 0.9, 1.6, 2.8], dtype=torch.float64))
    kwargs = dict(method="kernel_shap", num_samples=400, seed=0)
    consistent = explain(model, x, perturbation, calibrator, mode="consistent", **kwargs)
    plain = explain(model, x, perturbation, calibrator, **kwargs)
    shared = GlobalTemperature()
    shared.set_log_temperatures(torch.tensor([math.log(consistent.shared_temperature)], dtype=torch.float64))
    exact = explain(model, x, perturbation, shared, method="shapley_exact")
    # attributions are ~1e-2; measured error 4e-5 (consistent) vs ~5e-3 (plain, which carries the level trend)
    assert (consistent.attributions - exact.attributions).abs().max() < 1e-4
    assert (plain.attributions - exact.attributions).abs().max() > 1e-3
    assert exact.attributions[:, 0].abs().max() < 1e-7  # the null patch


class _Counting(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.rows = model, 0

    def forward(self, x):
        self.rows += x.shape[0]
        return self.model(x)


@pytest.mark.parametrize("method", METHODS)
def test_consistent_needs_no_extra_model_evaluations(method):
    model, x, perturbation = null_patch_setup()
    calibrator = steep_binned()
    counts = {}
    for mode in ("plain", "consistent"):
        counting = _Counting(model)
        e = explain(counting, x, perturbation, calibrator, method=method, mode=mode, num_samples=50, seed=0)
        counts[mode] = (counting.rows, e.num_evaluations)
    assert counts["plain"] == counts["consistent"]
    # 50 coalitions per input, one batch forward for the targets and one for Captum's batch probe
    assert counts["plain"][0] == x.shape[0] * 50 + 2 * x.shape[0]


@pytest.mark.parametrize("d", [1, 2, 5, 64])
def test_surrogate_size_weights(d):
    k = torch.arange(d + 1, dtype=torch.float64)
    lime = surrogate_size_weights("lime", d)
    binomial = torch.tensor([math.comb(d, int(i)) / 2**d for i in k], dtype=torch.float64)
    expected = binomial * torch.exp(-((1 - (k / d).sqrt()) ** 2) / 2)
    assert torch.allclose(lime, expected / expected.sum(), rtol=1e-10, atol=1e-300)
    shap = surrogate_size_weights("kernel_shap", d)
    assert shap.sum().item() == pytest.approx(1.0)
    if d > 1:
        assert shap[0] == 0 and shap[-1] == 0
        interior = 1 / (k[1:d] * (d - k[1:d]))
        assert torch.allclose(shap[1:d], interior / interior.sum())
    with pytest.raises(ValueError, match="method"):
        surrogate_size_weights("shapley_sampling", d)


def test_rules_order_and_uncalibrated():
    """T grows with the level, so the smaller-coalition rule (higher levels) gives the largest T*."""
    calibrator = steep_binned()
    for method in METHODS:
        smaller, mean, larger = (surrogate_temperature(calibrator, 16, method, r) for r in RULES)
        assert smaller > mean > larger
        if method == "kernel_shap":  # symmetric size distribution: mean is the log-midpoint
            assert mean == pytest.approx(math.sqrt(smaller * larger), rel=1e-12)
        assert surrogate_temperature(None, 16, method) == 1.0
    model, x, perturbation = null_patch_setup()
    e = explain(model, x, perturbation, None, method="lime", mode="consistent", num_samples=20)
    assert e.shared_temperature == 1.0
    with pytest.raises(ValueError, match="consistent_temperature"):
        surrogate_temperature(calibrator, 4, "lime", "median")
