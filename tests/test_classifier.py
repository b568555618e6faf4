"""RecalibratedClassifier and Captum at exact levels: exact Shapley values by enumeration as the oracle."""

import itertools
import math

import pytest
import torch
from captum.attr import FeatureAblation, KernelShap, Lime, ShapleyValues, ShapleyValueSampling
from torch import nn

from recalx_lightning import (
    BinnedTemperature,
    GlobalTemperature,
    Perturbation,
    RecalibratedClassifier,
    SmoothTemperature,
)

D = 5


def tiny_model(in_features=D, num_classes=3):
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(in_features, 8), nn.Tanh(), nn.Linear(8, num_classes)).eval()


def calibrators():
    binned, smooth, global_ = BinnedTemperature(5), SmoothTemperature(5), GlobalTemperature()
    binned.set_log_temperatures(torch.tensor([0.0, 0.4, 0.9, 1.5, 2.2], dtype=torch.float64))
    smooth.set_log_temperatures(torch.tensor([-0.3, 0.4, 0.9, 1.5, 2.2], dtype=torch.float64))
    global_.set_log_temperatures(torch.tensor([0.7], dtype=torch.float64))
    return {"binned": binned, "smooth": smooth, "global": global_}


def enumerate_shapley(model, calibrator, x, baseline, target):
    """Shapley values from all 2^d subsets, each evaluated with its own level's temperature."""

    def value(subset):
        z = baseline.clone()
        z[list(subset)] = x[list(subset)]
        level = torch.tensor([(D - len(subset)) / D], dtype=torch.float64)
        logits = model(z[None])
        return calibrator(logits, level).softmax(1)[0, target].item()

    phi = torch.zeros(D, dtype=torch.float64)
    for i in range(D):
        others = [j for j in range(D) if j != i]
        for size in range(D):
            weight = math.factorial(size) * math.factorial(D - size - 1) / math.factorial(D)
            for subset in itertools.combinations(others, size):
                phi[i] += weight * (value((*subset, i)) - value(subset))
    return phi


@pytest.mark.parametrize("kind", ["binned", "smooth", "global"])
def test_exact_shapley_through_captum_equals_enumeration(kind):
    model = tiny_model()
    calibrator = calibrators()[kind]
    x = torch.tensor([[0.5, -1.0, 0.0, 2.0, 0.3]])  # feature 2 already equals the zero baseline
    classifier = RecalibratedClassifier(model, calibrator, Perturbation.tabular(D)).double()
    inputs, baselines = classifier.keep_inputs(x.double())
    attributions = ShapleyValues(classifier.keep_forward).attribute(
        inputs, baselines=baselines, target=1, additional_forward_args=(x.double(),), perturbations_per_eval=7
    )
    expected = enumerate_shapley(model.double(), calibrator, x[0].double(), torch.zeros(D, dtype=torch.float64), 1)
    assert torch.allclose(attributions[0].double(), expected, atol=1e-6)  # Captum accumulates in float32
    # the efficiency axiom: values sum to f(x) - f(baseline) at their own temperatures
    full = classifier(x.double())[0, 1]
    empty = classifier(x.double(), torch.zeros(1, D))[0, 1]
    assert attributions.sum().item() == pytest.approx((full - empty).item(), abs=1e-6)


def test_levels_seen_by_the_calibrator_are_exact_even_on_baseline_equal_features():
    seen = []

    class Recorder(BinnedTemperature):
        def forward(self, logits, levels=None):
            seen.append(levels.clone())
            return super().forward(logits, levels)

    x = torch.zeros(1, D)
    x[0, 0] = 1.0  # four of five features equal the baseline
    classifier = RecalibratedClassifier(tiny_model(), Recorder(5), Perturbation.tabular(D))
    inputs, baselines = classifier.keep_inputs(x)
    ShapleyValues(classifier.keep_forward).attribute(
        inputs, baselines=baselines, target=0, additional_forward_args=(x,), perturbations_per_eval=32
    )
    levels = torch.cat(seen)
    assert sorted(set(levels.tolist())) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert len(levels) == math.factorial(D) * D + 1  # Captum walks all permutations


def test_batched_captum_explainers_run_with_several_inputs():
    images = torch.rand(2, 1, 4, 4)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).eval()
    perturbation = Perturbation.patches((4, 4), patch_size=2)
    classifier = RecalibratedClassifier(model, calibrators()["binned"].float(), perturbation)
    inputs, baselines = classifier.keep_inputs(images)
    target = torch.tensor([0, 2])
    reference = None
    for explainer, kwargs in [
        (ShapleyValueSampling, {"n_samples": 3}),
        (FeatureAblation, {}),
        (KernelShap, {"n_samples": 30}),
        (Lime, {"n_samples": 30}),
    ]:
        torch.manual_seed(0)
        attribution = explainer(classifier.keep_forward).attribute(
            inputs, baselines=baselines, target=target, additional_forward_args=(images,),
            perturbations_per_eval=4, **kwargs,
        )
        assert attribution.shape == (2, 4) and torch.isfinite(attribution).all()
        if explainer is FeatureAblation:
            reference = attribution
    # feature ablation of feature j at level 1/4 equals an independent per-input computation
    for i in range(2):
        for j in range(4):
            keep = torch.ones(1, 4)
            keep[0, j] = 0
            full = classifier(images[i : i + 1])[0, target[i]]
            ablated = classifier(images[i : i + 1], keep)[0, target[i]]
            assert reference[i, j].item() == pytest.approx((full - ablated).item(), abs=1e-6)
    assert perturbation.to_pixels(reference).shape == (2, 4, 4)


def test_argmax_unchanged_and_identity_without_calibrator():
    x = torch.randn(50, D)
    keep = torch.randint(0, 2, (50, D))
    model = tiny_model()
    perturbation = Perturbation.tabular(D)
    recalibrated = RecalibratedClassifier(model, calibrators()["binned"].float(), perturbation)
    plain = RecalibratedClassifier(model, None, perturbation, output="logits")
    bare = model(perturbation.apply(x, keep))
    assert torch.equal(recalibrated(x, keep).argmax(1), bare.argmax(1))
    assert torch.equal(plain(x, keep), bare)
    assert torch.allclose(recalibrated(x), model(x).softmax(1))  # level 0 and T_0 = 1
    with pytest.raises(ValueError, match="output"):
        RecalibratedClassifier(model, None, perturbation, output="odds")
