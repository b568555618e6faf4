"""Quality metrics against hand-computed cases; global importance on synthetic tabular data."""

import math

import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

from recalx_lightning import Perturbation
from recalx_lightning.explain.quality import (
    alignment,
    boxes_to_masks,
    deletion_curve,
    insertion_curve,
    localization,
    max_sensitivity,
    paired_bootstrap_ci,
    pointing_game,
    spearman,
)

NAN = float("nan")


def test_boxes_to_masks_half_open_and_empty():
    masks = boxes_to_masks(torch.tensor([[1, 0, 3, 2], [2, 2, 2, 4]]), (3, 4))
    expected = torch.zeros(2, 3, 4, dtype=torch.bool)
    expected[0, 0:2, 1:3] = True
    assert torch.equal(masks, expected)  # second box has zero width: empty


def test_localization_hand_cases():
    maps = torch.tensor(
        [
            [[1.0, 2.0], [-5.0, 1.0]],  # positive mass 4, inside (top row) 3
            [[-1.0, -2.0], [-3.0, -4.0]],  # all negative: undefined
            [[1.0, 1.0], [1.0, 1.0]],  # empty region
        ]
    )
    region = torch.zeros(3, 2, 2, dtype=torch.bool)
    region[0, 0] = True
    region[1, 0] = True
    got = localization(maps, region)
    assert got[0] == pytest.approx(0.75) and math.isnan(got[1]) and got[2] == 0
    boxes = torch.tensor([[0, 0, 2, 1], [0, 0, 2, 1], [0, 0, 0, 0]])
    assert torch.allclose(localization(maps, boxes), got, equal_nan=True)


def test_pointing_game_hits_misses_and_ties():
    maps = torch.tensor(
        [
            [[0.0, 3.0], [1.0, 2.0]],  # max at (0, 1): inside
            [[0.0, 3.0], [1.0, 2.0]],  # outside
            [[2.0, 2.0], [2.0, 2.0]],  # four-way tie, one pixel inside
            [[-3.0, -1.0], [-1.0, -2.0]],  # all negative: max -1 at two pixels, both inside
        ]
    )
    region = torch.zeros(4, 2, 2, dtype=torch.bool)
    region[0, 0, 1] = True
    region[1, 1, 0] = True
    region[2, 0, 0] = True
    region[3, 0, 1] = region[3, 1, 0] = True
    assert torch.equal(pointing_game(maps, region), torch.tensor([1.0, 0.0, 0.25, 1.0], dtype=torch.float64))


def test_spearman_ties_against_scipy_and_constant_is_nan():
    a = torch.tensor([[1.0, 2.0, 2.0, 3.0, 0.0, 2.0], [5.0, 5.0, 5.0, 5.0, 5.0, 5.0]])
    b = torch.tensor([[0.5, 0.1, 0.1, 2.0, 0.0, 3.0], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    got = spearman(a, b)
    assert got[0].item() == pytest.approx(spearmanr(a[0].tolist(), b[0].tolist()).statistic, abs=1e-12)
    assert math.isnan(got[1])
    assert spearman(b[1:], b[1:]).item() == pytest.approx(1.0)


def test_alignment_conventions_reported_apart():
    maps = torch.tensor([[[-3.0, -1.0], [0.5, 2.0]]])
    reference = torch.tensor([[[3.0, 1.0], [0.0, 2.0]]])
    got = alignment(maps, reference)
    assert set(got) == {"signed", "absolute", "positive"}
    # ranks: signed [1,2,3,4] vs ref [4,2,1,3] → ρ = -0.4; |a| = [3,1,.5,2] → [4,2,1,3] → 1;
    # a⁺ = [0,0,.5,2] → [1.5,1.5,3,4]
    assert got["signed"].item() == pytest.approx(-0.4)
    assert got["absolute"].item() == pytest.approx(1.0)
    expected_pos = spearmanr([0, 0, 0.5, 2.0], [3.0, 1.0, 0.0, 2.0]).statistic
    assert got["positive"].item() == pytest.approx(expected_pos)
    with pytest.raises(ValueError, match="conventions"):
        alignment(maps, reference, ("sign",))


class _LinearTwoClass(nn.Module):
    """Logits (w·x, 0): p(class 0) = sigmoid(w·x), so every deletion step is known in closed form."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = w

    def forward(self, x):
        z = x.flatten(1) @ self.w
        return torch.stack([z, torch.zeros_like(z)], 1)


def test_deletion_and_insertion_curves_on_a_linear_model():
    w = torch.tensor([3.0, -1.0, 2.0, 0.5])
    model = _LinearTwoClass(w)
    x = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    perturbation = Perturbation.tabular(4)
    attributions = (w * x).double()  # exact contributions: order 0, 2, 3, 1
    target = torch.tensor([0])
    deletion = deletion_curve(model, x, attributions, perturbation, target, batch_size=3)
    partial = torch.tensor([4.5, 1.5, -0.5, -1.0, 0.0])  # w·x after removing 0, 1, 2, 3, 4 top features
    assert torch.allclose(deletion.scores[0], torch.sigmoid(partial).double(), atol=1e-6)
    assert torch.allclose(deletion.fractions, torch.linspace(0, 1, 5, dtype=torch.float64))
    expected_auc = torch.trapezoid(torch.sigmoid(partial).double(), dx=0.25)
    assert deletion.auc[0].item() == pytest.approx(expected_auc.item(), abs=1e-6)
    insertion = insertion_curve(model, x, attributions, perturbation, target)
    inserted = torch.tensor([0.0, 3.0, 5.0, 5.5, 4.5])
    assert torch.allclose(insertion.scores[0], torch.sigmoid(inserted).double(), atol=1e-6)
    # a worse ranking (reversed) deletes more slowly: higher deletion AUC
    worse = deletion_curve(model, x, -attributions, perturbation, target)
    assert worse.auc[0] > deletion.auc[0]
    coarse = deletion_curve(model, x, attributions, perturbation, target, num_steps=2)
    assert torch.allclose(coarse.scores[0], torch.sigmoid(partial[[0, 2, 4]]).double(), atol=1e-6)


def test_deletion_ties_are_stable_by_feature_index():
    model = _LinearTwoClass(torch.tensor([1.0, 2.0, 4.0]))
    x = torch.ones(1, 3)
    curve = deletion_curve(model, x, torch.zeros(1, 3, dtype=torch.float64), Perturbation.tabular(3), torch.tensor([0]))
    assert torch.allclose(curve.scores[0], torch.sigmoid(torch.tensor([7.0, 6.0, 4.0, 0.0])).double(), atol=1e-6)


def test_curve_validation():
    model = _LinearTwoClass(torch.ones(3))
    with pytest.raises(ValueError, match="attributions"):
        deletion_curve(model, torch.ones(2, 3), torch.zeros(2, 4), Perturbation.tabular(3), torch.zeros(2).long())
    with pytest.raises(ValueError, match="target"):
        deletion_curve(model, torch.ones(2, 3), torch.zeros(2, 3), Perturbation.tabular(3), torch.zeros(3).long())


def test_max_sensitivity_of_linear_explainer():
    """φ(x) = 2x: the change is 2‖ε‖₂, maximised over seeded uniform noise; reproducible."""
    x = torch.zeros(2, 5)

    def explainer(v):
        return 2 * v

    got = max_sensitivity(explainer, x, radius=0.1, num_samples=4, seed=3)
    generator = torch.Generator().manual_seed(3)
    noises = [(torch.rand(2, 5, generator=generator, dtype=torch.float64) * 2 - 1) * 0.1 for _ in range(4)]
    expected = torch.stack([(2 * e).norm(dim=1) for e in noises]).max(0).values
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.equal(got, max_sensitivity(explainer, x, radius=0.1, num_samples=4, seed=3))
    assert torch.all(max_sensitivity(lambda v: torch.ones_like(v), x) == 0)
    with pytest.raises(ValueError, match="radius"):
        max_sensitivity(explainer, x, radius=0)


def test_paired_bootstrap_ci():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0, NAN])
    b = torch.tensor([0.5, 1.5, 2.5, 3.5, 1.0])
    result = paired_bootstrap_ci(a, b, seed=0)
    assert result.mean_difference == pytest.approx(0.5) and result.low == pytest.approx(0.5)
    assert result.high == pytest.approx(0.5) and result.num_pairs == 4
    generator = torch.Generator().manual_seed(0)
    noisy_a = torch.randn(200, generator=generator) + 0.3
    noisy_b = torch.randn(200, generator=generator)
    r = paired_bootstrap_ci(noisy_a, noisy_b, num_resamples=500, confidence=0.9, seed=1)
    assert r.low < r.mean_difference < r.high
    assert r == paired_bootstrap_ci(noisy_a, noisy_b, num_resamples=500, confidence=0.9, seed=1)
    with pytest.raises(ValueError, match="paired"):
        paired_bootstrap_ci(a, b[:3])
    with pytest.raises(ValueError, match="confidence"):
        paired_bootstrap_ci(a, b, confidence=1.5)


# ----------------------------------------------------------------------------------- global importance
from recalx_lightning import BinnedTemperature  # noqa: E402
from recalx_lightning.explain.importance import (  # noqa: E402
    decompose_predictive_power,
    global_importance,
    recovery_auroc,
)


def _synthetic_tabular(n=400, seed=0):
    """y = 1[2x₀ − 1.5x₁ + x₂ > 0] on 6 standard normal features; the true logistic model as classifier."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=generator)
    w = torch.tensor([2.0, -1.5, 1.0, 0.0, 0.0, 0.0])
    y = ((x @ w) > 0).long()
    model = nn.Linear(6, 2)
    with torch.no_grad():
        model.weight.copy_(torch.stack([-w, w]) * 0.5)
        model.bias.zero_()
    return model, x, y


def test_global_importance_recovers_informative_features_and_is_efficient():
    model, x, y = _synthetic_tabular()
    perturbation = Perturbation.tabular(6)
    result = global_importance(model, x, y, perturbation, num_permutations=32, seed=0)
    informative = torch.tensor([True, True, True, False, False, False])
    assert recovery_auroc(result.values, informative) == 1.0
    assert torch.allclose(result.values[3:], torch.zeros(3, dtype=torch.float64), atol=1e-12)  # null features
    assert result.values.sum().item() == pytest.approx(result.total, abs=1e-9)
    with torch.no_grad():
        loss_empty = nn.functional.cross_entropy(model(torch.zeros_like(x)), y).item()
        loss_full = nn.functional.cross_entropy(model(x), y).item()
    assert result.total == pytest.approx(loss_empty - loss_full, abs=1e-5)
    calibrated = global_importance(model, x, y, perturbation, BinnedTemperature(3), num_permutations=2)
    assert calibrated.values.shape == (6,)


def test_recovery_auroc_hand_cases():
    assert recovery_auroc(torch.tensor([3.0, 1.0, 2.0]), torch.tensor([True, False, False])) == 1.0
    assert recovery_auroc(torch.tensor([1.0, 1.0, 2.0]), torch.tensor([True, False, False])) == 0.25
    with pytest.raises(ValueError, match="informative"):
        recovery_auroc(torch.ones(3), torch.ones(3, dtype=torch.bool))


def test_decompose_predictive_power_bias_and_identity():
    generator = torch.Generator().manual_seed(0)
    probs = torch.rand(300, generator=generator) * 0.8 + 0.1
    labels = torch.bernoulli(probs, generator=generator).long()  # calibrated by construction
    logits = torch.stack([torch.zeros(300), (probs / (1 - probs)).log()], 1).double()
    q = torch.tensor([[0.8, 0.2]], dtype=torch.float64)
    parts = decompose_predictive_power(logits, q.log(), labels)
    prior = torch.bincount(labels, minlength=2).double() / 300
    kl_prior = float((prior * (prior / q[0]).log()).sum())
    assert parts.baseline_bias == pytest.approx(kl_prior, abs=1e-12)
    assert parts.value == pytest.approx(parts.baseline_bias + parts.information - parts.calibration_error)
    assert 0 <= parts.calibration_error < 0.05 and parts.information > 0
    with pytest.raises(ValueError, match="empty_logits"):
        decompose_predictive_power(logits, q.log()[:, :1], labels)
