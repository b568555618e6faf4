"""explain(): exact-Shapley oracle by enumeration, Captum equality, seeding and validation."""

import itertools
import math

import pytest
import torch
from torch import nn

from recalx_lightning import BinnedTemperature, GlobalTemperature, Perturbation, SmoothTemperature
from recalx_lightning.explain import explain, explain_variants

D = 5


def _calibrator(kind: str):
    cal = {"binned": BinnedTemperature(10), "smooth": SmoothTemperature(10), "global": GlobalTemperature()}[kind]
    generator = torch.Generator().manual_seed(1)
    cal.set_log_temperatures(torch.randn(cal.num_bins, generator=generator, dtype=torch.float64))
    return cal


def _setup():
    perturbation = Perturbation(torch.tensor([[0, 0, 1, 2], [3, 3, 4, 4]]))  # d = 5 on (C, 2, 4)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3))
    x = torch.randn(3, 2, 2, 4) * 2
    return model, x, perturbation


def _oracle_values(model, x, perturbation, calibrator, target):
    """v[S] for every subset S (tuple of kept features) and its level temperature, by direct enumeration."""
    logits, temps = {}, {}
    for r in range(D + 1):
        for subset in itertools.combinations(range(D), r):
            keep = torch.zeros(1, D)
            keep[0, list(subset)] = 1
            logits[subset] = model(perturbation.apply(x, keep.expand(x.shape[0], D))).double()
            level = torch.tensor([(D - r) / D], dtype=torch.float64)
            temps[subset] = 1.0 if calibrator is None else float(calibrator.temperature(level))
    return logits, temps


def oracle_shapley(model, x, perturbation, calibrator, target, rule=None):
    """Σ_S |S|!(d−|S|−1)!/d! (v(S∪j) − v(S)); rule None: each coalition at its own T, else one T* per pair."""
    with torch.no_grad():
        logits, temps = _oracle_values(model, x, perturbation, calibrator, target)
    phi = torch.zeros(x.shape[0], D, dtype=torch.float64)

    def value(subset, t):
        return (logits[subset] / t).softmax(-1).gather(1, target[:, None]).squeeze(1)

    for j in range(D):
        others = [i for i in range(D) if i != j]
        for r in range(D):
            weight = math.factorial(r) * math.factorial(D - r - 1) / math.factorial(D)
            for subset in itertools.combinations(others, r):
                joined = tuple(sorted(subset + (j,)))
                t_small, t_large = temps[subset], temps[joined]
                if rule == "smaller":
                    t_small = t_large = temps[subset]
                elif rule == "larger":
                    t_small = t_large = temps[joined]
                elif rule == "mean":
                    t_small = t_large = math.sqrt(temps[subset] * temps[joined])
                phi[:, j] += weight * (value(joined, t_large) - value(subset, t_small))
    return phi


@pytest.mark.parametrize("kind", ["binned", "smooth", "global", None])
def test_exact_shapley_matches_enumeration_and_captum(kind):
    model, x, perturbation = _setup()
    calibrator = None if kind is None else _calibrator(kind)
    target = torch.tensor([0, 1, 2])
    expected = oracle_shapley(model, x, perturbation, calibrator, target)
    native = explain(model, x, perturbation, calibrator, target, method="shapley_exact", perturbations_per_eval=7)
    captum = explain(model, x, perturbation, calibrator, target, method="shapley_exact", backend="captum")
    assert torch.allclose(native.attributions, expected, atol=1e-6, rtol=0)
    assert torch.allclose(captum.attributions, expected, atol=1e-6, rtol=0)
    assert native.maps.shape == (3, 2, 4)
    assert torch.equal(native.maps[:, 0, 0], native.attributions[:, 0])
    assert native.num_evaluations == 3 * 2**D


@pytest.mark.parametrize("rule", ["smaller", "larger", "mean"])
@pytest.mark.parametrize("kind", ["binned", "smooth"])
def test_consistent_exact_matches_enumeration(kind, rule):
    model, x, perturbation = _setup()
    calibrator = _calibrator(kind)
    target = torch.tensor([2, 0, 1])
    expected = oracle_shapley(model, x, perturbation, calibrator, target, rule=rule)
    plain = oracle_shapley(model, x, perturbation, calibrator, target)
    got = explain(
        model, x, perturbation, calibrator, target, method="shapley_exact", mode="consistent",
        consistent_temperature=rule,
    )
    assert torch.allclose(got.attributions, expected, atol=1e-6, rtol=0)
    assert not torch.allclose(expected, plain, atol=1e-4)


@pytest.mark.parametrize("per_eval", [1, 6, 64])
@pytest.mark.parametrize("kind", ["binned", "smooth", None])
def test_native_sampling_equals_captum_same_seed(kind, per_eval):
    model, x, perturbation = _setup()
    calibrator = None if kind is None else _calibrator(kind)
    kwargs = dict(method="shapley_sampling", num_samples=7, perturbations_per_eval=per_eval, seed=3)
    native = explain(model, x, perturbation, calibrator, None, **kwargs)
    captum = explain(model, x, perturbation, calibrator, None, backend="captum", **kwargs)
    assert torch.allclose(native.attributions, captum.attributions, atol=1e-6, rtol=0)
    assert native.num_evaluations == 3 * (7 * (D - 1) + 2) < captum.num_evaluations


def test_native_sampling_equals_captum_on_images():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                          nn.Linear(16, 5))
    perturbation = Perturbation.patches(12, patch_size=4, baseline="blur")
    x = torch.randn(2, 3, 12, 12)
    calibrator = _calibrator("binned")
    kwargs = dict(method="shapley_sampling", num_samples=4, perturbations_per_eval=5, seed=11)
    native = explain(model, x, perturbation, calibrator, **kwargs)
    captum = explain(model, x, perturbation, calibrator, backend="captum", **kwargs)
    assert torch.allclose(native.attributions, captum.attributions, atol=1e-6, rtol=0)
    assert native.maps.shape == (2, 12, 12)


def test_sampling_converges_to_exact_and_is_efficient():
    model, x, perturbation = _setup()
    calibrator = _calibrator("binned")
    exact = explain(model, x, perturbation, calibrator, 1, method="shapley_exact").attributions
    sampled = explain(model, x, perturbation, calibrator, 1, num_samples=400).attributions
    assert (sampled - exact).abs().max() < 0.02
    # efficiency per permutation: Σ_j φ_j = v(N) − v(∅) exactly in plain mode
    with torch.no_grad():
        full = (model(x).double() / calibrator.temperature(torch.zeros(1))).softmax(-1)[:, 1]
        empty = (model(torch.zeros_like(x)).double() / calibrator.temperature(torch.ones(1))).softmax(-1)[:, 1]
    assert torch.allclose(sampled.sum(1), full - empty, atol=1e-6)


@pytest.mark.parametrize("method", ["feature_ablation", "occlusion"])
def test_feature_ablation_matches_captum_and_definition(method):
    model, x, perturbation = _setup()
    calibrator = _calibrator("smooth")
    native = explain(model, x, perturbation, calibrator, 0, method=method, output="log_probs")
    captum = explain(model, x, perturbation, calibrator, 0, method=method, output="log_probs", backend="captum")
    assert torch.allclose(native.attributions, captum.attributions, atol=1e-5)
    keep = torch.ones(1, D)
    keep[0, 3] = 0
    with torch.no_grad():
        t0, t1 = calibrator.temperature(torch.tensor([0.0, 1 / D], dtype=torch.float64))
        v_full = (model(x).double() / t0).log_softmax(-1)[:, 0]
        v_drop = (model(perturbation.apply(x, keep.expand(3, D))).double() / t1).log_softmax(-1)[:, 0]
    assert torch.allclose(native.attributions[:, 3], v_full - v_drop, atol=1e-6)


def test_seed_reproducible_and_global_rng_untouched():
    model, x, perturbation = _setup()
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = explain(model, x, perturbation, None, num_samples=5, seed=1).attributions
    after = torch.rand(3)
    b = explain(model, x, perturbation, None, num_samples=5, seed=1).attributions
    c = explain(model, x, perturbation, None, num_samples=5, seed=2).attributions
    assert torch.equal(before, after)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_lime_and_kernel_shap_run_with_ridge_default():
    model, x, perturbation = _setup()
    calibrator = _calibrator("binned")
    for method in ("lime", "kernel_shap"):
        e = explain(model, x[:1], perturbation, calibrator, method=method, num_samples=60)
        assert e.attributions.shape == (1, D) and torch.isfinite(e.attributions).all()
        assert e.attributions.abs().sum() > 0


def test_lime_ridge_default_is_not_zeroed_on_flat_outputs():
    """Near-saturated probabilities: Lasso(alpha=0.01) zeroes everything, the ridge default does not."""
    model, x, perturbation = _setup()
    flat = nn.Sequential(model, nn.Softmax(-1), nn.Linear(3, 3))
    with torch.no_grad():
        flat[2].weight.copy_(torch.eye(3) * 0.05)
        flat[2].bias.zero_()
    ridge = explain(flat, x[:1], perturbation, None, 0, method="lime", num_samples=80, output="logits")
    lasso = explain(flat, x[:1], perturbation, None, 0, method="lime", num_samples=80, output="logits",
                    surrogate="lasso")
    assert lasso.attributions.abs().max() == 0
    assert ridge.attributions.abs().max() > 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(method="gradcam"), "method"),
        (dict(mode="consistent", backend="captum"), "consistent"),
        (dict(method="feature_ablation", mode="consistent", backend="captum"), "native"),
        (dict(method="lime", backend="native"), "native"),
        (dict(num_samples=0), "num_samples"),
        (dict(perturbations_per_eval=0), "perturbations_per_eval"),
        (dict(consistent_temperature="median"), "consistent_temperature"),
        (dict(output="prob"), "output"),
        (dict(target=torch.tensor([0.5, 1.0, 0.0])), "target"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    model, x, perturbation = _setup()
    with pytest.raises(ValueError, match=match):
        explain(model, x, perturbation, **kwargs)


def test_exact_refuses_large_d_and_bad_mask():
    model = nn.Sequential(nn.Flatten(), nn.Linear(20, 2))
    with pytest.raises(ValueError, match="shapley_exact"):
        explain(model, torch.randn(1, 20), Perturbation.tabular(20), method="shapley_exact")
    with pytest.raises(ValueError, match="feature_mask"):
        explain(model, torch.randn(1, 21), Perturbation.tabular(20))


def test_non_finite_inputs_are_rejected_before_any_evaluation():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    images = torch.rand(2, 1, 4, 4)
    images[1, 0, 2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"`inputs` contains 1 non-finite values .* \[\[1, 0, 2, 3\]\]"):
        explain(model, images, Perturbation.patches(4, patch_size=2), num_samples=2)


class _CountingModel(nn.Module):
    """Counts the single inputs it evaluates."""

    def __init__(self, model):
        super().__init__()
        self.model, self.evaluations = model, 0

    def forward(self, x):
        self.evaluations += x.shape[0]
        return self.model(x)


@pytest.mark.parametrize(("method", "num_samples"), [("shapley_sampling", 4), ("shapley_exact", None),
                                                     ("feature_ablation", None), ("lime", 40), ("kernel_shap", 40)])
def test_one_pass_serves_every_variant_and_equals_separate_calls(method, num_samples):
    """uncalibrated + binned plain + binned consistent + smooth plain cost one variant's evaluations, and each
    variant's attributions equal a separate `explain` call bit for bit."""
    model, x, perturbation = _setup()
    counting = _CountingModel(model)
    binned, smooth = _calibrator("binned"), _calibrator("smooth")
    variants = {"uncalibrated/plain": (None, "plain"), "binned/plain": (binned, "plain"),
                "binned/consistent": (binned, "consistent"), "smooth/plain": (smooth, "plain")}
    target = torch.tensor([0, 2, 1])
    kwargs = dict(target=target, method=method, num_samples=num_samples, perturbations_per_eval=7, seed=5)
    together = explain_variants(counting, x, perturbation, variants, **kwargs)
    shared_cost = counting.evaluations
    for name, (calibrator, mode) in variants.items():
        counting.evaluations = 0
        alone = explain(counting, x, perturbation, calibrator, mode=mode, **kwargs)
        assert counting.evaluations == shared_cost, name
        assert torch.equal(together[name].attributions, alone.attributions), name
        assert together[name].shared_temperature == alone.shared_temperature
    assert together["binned/plain"].num_evaluations + x.shape[0] == shared_cost  # + the clean forward
    assert not torch.equal(together["binned/plain"].attributions, together["uncalibrated/plain"].attributions)


def test_variants_without_seed_share_the_global_rng_draw():
    """seed=None: every variant sees the same coalitions, drawn from the caller's RNG state."""
    model, x, perturbation = _setup()
    binned = _calibrator("binned")
    torch.manual_seed(11)
    together = explain_variants(model, x, perturbation, {"u": (None, "plain"), "b": (binned, "plain")}, target=0,
                                method="lime", num_samples=20, seed=None)
    after = torch.rand(1)
    torch.manual_seed(11)
    alone = explain(model, x, perturbation, binned, target=0, method="lime", num_samples=20, seed=None)
    assert torch.equal(together["b"].attributions, alone.attributions)
    assert torch.equal(torch.rand(1), after)  # the RNG advanced exactly as by one call
    with pytest.raises(ValueError, match="at least one"):
        explain_variants(model, x, perturbation, {}, method="lime")


def test_explain_settings_are_checked_once_frozen_and_recorded_as_the_explain_run_files_expect():
    """Bad options fail when the settings are built (and again on `replace`); the record keeps the run file keys."""
    import dataclasses

    from recalx_lightning.explain import ExplainSettings
    from recalx_lightning.explain.store import settings_record

    settings = ExplainSettings(calibrators=["uncalibrated", "smooth"], modes=["consistent"], num_samples=3)
    assert settings.calibrators == ("uncalibrated", "smooth") and settings.modes == ("consistent",)
    assert hash(settings) == hash(ExplainSettings(("uncalibrated", "smooth"), ("consistent",), num_samples=3))
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.seed = 1
    for bad, match in [(dict(calibrators="binned"), "`calibrators` must be a non-empty list"),
                       (dict(calibrators=[]), "`calibrators` must be a non-empty list"),
                       (dict(modes=["plane"]), "`modes` must be a non-empty list"),
                       (dict(method="shap"), "`method` must be one of"),
                       (dict(perturbations_per_eval=0), "`perturbations_per_eval` must be an integer >= 1"),
                       (dict(level="clean"), "`level` must be 'paper'")]:
        with pytest.raises(ValueError, match=match):
            ExplainSettings(**bad)
    with pytest.raises(ValueError, match="`num_samples` must be an integer >= 1"):
        dataclasses.replace(settings, num_samples=0)
    with pytest.raises(ValueError, match=r"from \['uncalibrated', 'binned'\]"):
        settings.check_calibrators(["binned"])
    record = settings_record(settings, ["uncalibrated/plain", "smooth/consistent"], split="evaluation")
    assert record == {"method": "shapley_sampling", "num_samples": 3, "perturbations_per_eval": 64, "seed": 0,
                      "level": "paper", "variants": ["uncalibrated/plain", "smooth/consistent"], "split": "evaluation"}
