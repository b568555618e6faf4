"""Top-label ECE, NLL and Brier score against direct loops, sklearn, and hand-computed edge cases."""

from __future__ import annotations

import math

import pytest
import torch
from sklearn.metrics import brier_score_loss, log_loss

from recalx_lightning.metrics import (
    BrierScore,
    NegativeLogLikelihood,
    TopLabelCalibrationError,
    brier_score,
    negative_log_likelihood,
    top_label_calibration_error,
)


def _data(n: int = 200, k: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * 2, torch.randint(k, (n,), generator=g)


def _ece_loop(probs: torch.Tensor, target: torch.Tensor, num_bins: int) -> float:
    """Guo et al.'s ECE by a Python loop over bins [b/B, (b+1)/B), the last one closed."""
    conf, pred = probs.max(1)
    total = 0.0
    for b in range(num_bins):
        lo, hi = b / num_bins, (b + 1) / num_bins
        inside = [i for i in range(len(conf)) if lo <= conf[i] < hi or (b == num_bins - 1 and conf[i] == 1.0)]
        if inside:
            acc = sum(float(pred[i] == target[i]) for i in inside) / len(inside)
            mean_conf = sum(float(conf[i]) for i in inside) / len(inside)
            total += len(inside) / len(conf) * abs(acc - mean_conf)
    return total


def test_ece_matches_loop() -> None:
    logits, target = _data()
    probs = torch.softmax(logits.double(), 1)
    expected = _ece_loop(probs, target, 15)
    assert float(top_label_calibration_error(logits, target)) == pytest.approx(expected, abs=1e-12)
    assert float(top_label_calibration_error(probs, target, "probs")) == pytest.approx(expected, abs=1e-12)


def test_confidence_one_belongs_to_last_bin() -> None:
    probs = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.55, 0.45], [0.55, 0.45]], dtype=torch.float64)
    target = torch.tensor([0, 1, 0, 0])
    metric = TopLabelCalibrationError(num_bins=10, input_type="probs")
    metric.update(probs, target)
    count, confidence, accuracy = metric.reliability()
    assert count.tolist() == [0, 0, 0, 0, 0, 2, 0, 0, 0, 2]
    assert float(confidence[9]) == pytest.approx(1.0, abs=1e-11) and float(accuracy[9]) == 0.5
    # bin 5: conf 0.55, acc 1 -> 0.45; bin 9: conf 1, acc 0.5 -> 0.5; each weighted by 1/2
    assert float(metric.compute()) == pytest.approx(0.475, abs=1e-12)
    assert float(top_label_calibration_error(probs, target, "probs", 10, norm="max")) == pytest.approx(0.5)
    # logits whose softmax is exactly 1.0 in float64
    logits = torch.tensor([[800.0, 0.0], [800.0, 0.0]])
    assert float(torch.log_softmax(logits.double(), 1).max(1).values.exp()[0]) == 1.0
    assert float(top_label_calibration_error(logits, torch.tensor([0, 0]), num_bins=10)) == 0.0


def test_nll_and_brier_match_sklearn() -> None:
    logits, target = _data(k=4)
    probs = torch.softmax(logits.double(), 1).numpy()
    assert float(negative_log_likelihood(logits, target)) == pytest.approx(
        log_loss(target.numpy(), probs, labels=range(4)), abs=1e-6
    )
    onehot = torch.nn.functional.one_hot(target, 4).numpy()
    brier_sklearn = sum(brier_score_loss(onehot[:, k], probs[:, k]) for k in range(4))
    assert float(brier_score(logits, target)) == pytest.approx(brier_sklearn, abs=1e-10)


def test_exact_zero_probability_gives_finite_nll() -> None:
    probs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    nll = negative_log_likelihood(probs, torch.tensor([1, 1]), "probs")
    assert float(nll) == pytest.approx(0.5 * -math.log(1e-12), rel=1e-9)
    huge = torch.tensor([[1000.0, -1000.0]])
    assert float(negative_log_likelihood(huge, torch.tensor([1]))) == pytest.approx(2000.0)


@pytest.mark.parametrize(("metric", "functional"), [
    (NegativeLogLikelihood(), negative_log_likelihood),
    (BrierScore(), brier_score),
    (TopLabelCalibrationError(), top_label_calibration_error),
])
def test_metrics_accumulate_like_functional(metric, functional) -> None:
    logits, target = _data(n=150)
    for start in (0, 50, 100):
        metric.update(logits[start : start + 50], target[start : start + 50])
    metric.update(logits[:0], target[:0])
    assert float(metric.compute()) == pytest.approx(float(functional(logits, target)), abs=1e-12)


@pytest.mark.parametrize("functional", [negative_log_likelihood, brier_score, top_label_calibration_error])
def test_bad_input(functional) -> None:
    logits, target = _data(n=10, k=3)
    with pytest.raises(ValueError, match="target"):
        functional(logits, target + 3)
    with pytest.raises(ValueError, match="shape"):
        functional(logits[:, 0], target)
    with pytest.raises(ValueError, match="non-finite"):
        functional(torch.full((10, 3), float("nan")), target)
    with pytest.raises(ValueError, match="at least 1 sample"):
        functional(logits[:0], target[:0])


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="norm"):
        TopLabelCalibrationError(norm="l3")
    with pytest.raises(ValueError, match="num_bins"):
        TopLabelCalibrationError(num_bins=0)
    with pytest.raises(ValueError, match="input_type"):
        BrierScore(input_type="probabilities")
