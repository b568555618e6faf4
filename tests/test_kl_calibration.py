"""KL calibration error: against a direct O(n²K) implementation, on calibrated / sharpened data, DDP, errors."""

from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from recalx_lightning.metrics import (
    DEFAULT_BANDWIDTHS,
    KLCalibrationError,
    beta_loo_log_likelihood,
    dirichlet_loo_log_likelihood,
    kl_calibration_error,
    select_bandwidth,
)
from recalx_lightning.metrics._inputs import log_probabilities
from recalx_lightning.metrics.kl_calibration import _candidates, _normalisers, _screen


# ------------------------------------------------------------------------------------------------ oracle
def _log_dirichlet(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """log Dir(x; alpha) for one point x (K,) and one parameter alpha (K,), straight from the density."""
    return torch.lgamma(alpha.sum()) - torch.lgamma(alpha).sum() + ((alpha - 1) * torch.log(x)).sum()


def _naive_log_kernel(p: torch.Tensor, b: float) -> torch.Tensor:
    """(n, n) matrix log Dir(p_i; p_j / b + 1) by a double loop, diagonal excluded (-inf)."""
    n = p.shape[0]
    out = torch.full((n, n), -math.inf, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            if i != j:
                out[i, j] = _log_dirichlet(p[i], p[j] / b + 1)
    return out


def _naive_kl_ce(p: torch.Tensor, y: torch.Tensor, b: float | None, grid=DEFAULT_BANDWIDTHS) -> tuple[float, float]:
    """Direct formulation: choose b by LOO likelihood, vote of one-hot labels, KL with 0 log 0 = 0."""
    n, k = p.shape
    if b is None:
        best = -math.inf
        for cand in grid:
            ll = float((torch.logsumexp(_naive_log_kernel(p, cand), 1) - math.log(n - 1)).sum())
            if ll > best:
                best, b = ll, cand
    kern = _naive_log_kernel(p, b).exp()
    onehot = torch.nn.functional.one_hot(y, k).double()
    total = 0.0
    for i in range(n):
        c = (kern[i, :, None] * onehot).sum(0) / kern[i].sum()
        total += sum(float(c[m] * math.log(c[m] / p[i, m])) for m in range(k) if c[m] > 0)
    return total / n, b


def _dirichlet_preds(n: int, k: int, seed: int, concentration: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    alpha = torch.full((k,), concentration, dtype=torch.float64)
    gamma = torch._standard_gamma(alpha.expand(n, k).contiguous(), generator=g)
    p = gamma / gamma.sum(1, keepdim=True)
    p = p.clamp_min(1e-6)
    p = p / p.sum(1, keepdim=True)
    y = torch.randint(k, (n,), generator=g)
    return p, y


# ------------------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("k", [2, 10, 100])
@pytest.mark.parametrize("bandwidth", [0.05, None])
def test_equals_direct_implementation(k: int, bandwidth: float | None) -> None:
    n = 40 if k < 100 else 25
    p, y = _dirichlet_preds(n, k, seed=k)
    expected, expected_b = _naive_kl_ce(p, y, bandwidth)
    value, used_b = kl_calibration_error(p, y, input_type="probs", bandwidth=bandwidth, block_size=7)
    assert used_b == expected_b
    assert abs(float(value) - expected) <= 1e-10
    # logits of the same predictions give the same value (log-softmax of log p is log p).
    value_logits, _ = kl_calibration_error(p.log(), y, bandwidth=used_b)
    assert abs(float(value_logits) - expected) <= 1e-10


def test_block_size_does_not_change_value() -> None:
    p, y = _dirichlet_preds(57, 5, seed=1)
    values = [float(kl_calibration_error(p, y, "probs", block_size=bs).value) for bs in (1, 8, 57, 1000)]
    assert max(values) - min(values) <= 1e-12


def test_loo_likelihood_matches_direct() -> None:
    p, _ = _dirichlet_preds(20, 4, seed=3)
    grid = [0.01, 0.1, 0.5]
    fast = dirichlet_loo_log_likelihood(p.log(), grid, block_size=6)
    direct = [float((torch.logsumexp(_naive_log_kernel(p, b), 1) - math.log(19)).sum()) for b in grid]
    assert torch.allclose(fast, torch.tensor(direct, dtype=torch.float64), rtol=0, atol=1e-9)


def test_exact_zero_and_one_probabilities_are_finite() -> None:
    p = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5]] * 5)
    y = torch.tensor([0, 1, 0, 2] * 5)
    value, _ = kl_calibration_error(p, y, input_type="probs")
    assert torch.isfinite(value) and value >= 0
    logits = torch.tensor([[300.0, -300.0, 0.0], [-900.0, 0.0, 900.0]] * 5)
    value, _ = kl_calibration_error(logits, torch.tensor([0, 1] * 5), bandwidth=0.1)
    assert torch.isfinite(value) and value > 1.0  # confident and half wrong: large but finite


# ------------------------------------------------------------------------------- float32 screening
@pytest.mark.parametrize(
    ("n", "k", "scale"), [(200, 2, 8.0), (150, 3, 0.5), (120, 10, 3.0), (80, 100, 2.0), (40, 1000, 4.0)]
)
def test_float32_screen_brackets_float64_likelihood(n: int, k: int, scale: float) -> None:
    g = torch.Generator().manual_seed(n + k)
    log_probs = log_probabilities(torch.randn(n, k, generator=g, dtype=torch.float64) * scale, "logits")
    grid = list(DEFAULT_BANDWIDTHS)
    exact = dirichlet_loo_log_likelihood(log_probs, grid, block_size=16)
    lower, upper = _screen(log_probs, log_probs.exp(), grid, _normalisers(log_probs.exp(), grid), 16)
    assert bool((lower <= exact).all() and (exact <= upper).all())
    keep = _candidates(log_probs, log_probs.exp(), grid, _normalisers(log_probs.exp(), grid), 16)
    assert int(torch.argmax(exact)) in keep
    assert select_bandwidth(log_probs, grid, block_size=16) == grid[int(torch.argmax(exact))]


def test_near_tied_bandwidths_are_resolved_in_float64() -> None:
    # Bandwidths 1e-12 apart cannot be separated in float32: several candidates go to the float64 sweep.
    p, y = _dirichlet_preds(60, 4, seed=5)
    log_probs = log_probabilities(p, "probs")
    best = select_bandwidth(log_probs)
    grid = [best / 2, best, best * (1 + 1e-12)]
    keep = _candidates(log_probs, p, grid, _normalisers(log_probs.exp(), grid), 8)
    assert len(keep) >= 2
    exact = dirichlet_loo_log_likelihood(log_probs, grid)
    expected_b = grid[int(torch.argmax(exact))]
    value, used_b = kl_calibration_error(p, y, "probs", bandwidth_grid=grid, block_size=8)
    assert used_b == expected_b == select_bandwidth(log_probs, grid)
    assert float(value) == pytest.approx(float(kl_calibration_error(p, y, "probs", bandwidth=used_b).value), abs=1e-14)
    naive, naive_b = _naive_kl_ce(p, y, None, grid=grid)
    assert naive_b == used_b and abs(float(value) - naive) <= 1e-10


def test_extreme_logits_skip_the_screen_and_stay_exact() -> None:
    # |log p| / b beyond float32's safe range: every bandwidth is scored in float64 instead.
    logits = torch.tensor([[1e27, 0.0, -1e27], [0.0, 1e26, 5.0], [3.0, 1.0, 2.0], [2.0, 2.0, 0.0]] * 4)
    y = torch.tensor([0, 1, 2, 0] * 4)
    log_probs = log_probabilities(logits, "logits")
    grid = list(DEFAULT_BANDWIDTHS)
    assert _screen(log_probs, log_probs.exp(), grid, _normalisers(log_probs.exp(), grid), 4) is None
    exact = dirichlet_loo_log_likelihood(log_probs, grid)
    value, used_b = kl_calibration_error(logits, y)
    assert used_b == grid[int(torch.argmax(exact))]
    assert float(value) == float(kl_calibration_error(logits, y, bandwidth=used_b).value)


# ------------------------------------------------------------------------------------------ behaviour
def _calibrated_sample(
    n: int, k: int, seed: int, tau: float = 1.0, scale: float = 1.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels drawn from p; returned predictions are p^(1/τ) renormalised (τ = 1: perfectly calibrated)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, generator=g, dtype=torch.float64) * scale
    y = torch.multinomial(torch.softmax(logits, 1), 1, generator=g).squeeze(1)
    return logits / tau, y


def test_near_zero_when_calibrated_and_increasing_when_sharpened() -> None:
    # The plug-in estimate is biased upwards by the label noise of the kernel vote, roughly (K - 1) / (2 n_eff).
    # Measured (benchmarks/bench_kl_calibration_error.py, logits ~ N(0, 1), K = 3): 0.0184 at n = 1,000 and
    # 0.0061 at n = 5,000.
    logits, y = _calibrated_sample(1000, 3, seed=0, scale=1.0)
    calibrated = float(kl_calibration_error(logits, y).value)
    assert 0 <= calibrated < 0.04
    values = [float(kl_calibration_error(logits / tau, y).value) for tau in (1.0, 0.7, 0.5, 0.3)]
    assert all(a < b for a, b in zip(values, values[1:]))
    assert values[-1] > 5 * values[0]


def test_metric_accumulates_batches_like_functional() -> None:
    logits, y = _calibrated_sample(300, 4, seed=2, tau=0.6)
    metric = KLCalibrationError()
    for chunk in range(3):
        metric.update(logits[chunk * 100 : (chunk + 1) * 100].float(), y[chunk * 100 : (chunk + 1) * 100])
    metric.update(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    expected = kl_calibration_error(logits.float(), y)
    assert torch.equal(metric.compute(), expected.value)
    assert metric.bandwidth_ == expected.bandwidth


# ------------------------------------------------------------------------------------------------ DDP
def _ddp_worker(rank: int, world: int, port: int, logits, y, queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results = []
        for variant in ("canonical", "top_label", "classwise"):
            metric = KLCalibrationError(variant=variant)
            shard = torch.arange(rank, logits.shape[0], world)  # uneven, interleaved shards
            metric.update(logits[shard[:10]], y[shard[:10]])
            metric.update(logits[shard[10:]], y[shard[10:]])
            if rank == 1:
                metric.update(logits[:0], y[:0])
            results.append((float(metric.compute()), metric.bandwidth_))
        queue.put((rank, results))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_equal_single_process() -> None:
    logits, y = _calibrated_sample(201, 6, seed=4, tau=0.5)
    singles = [kl_calibration_error(logits, y, variant=v) for v in ("canonical", "top_label", "classwise")]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(_ddp_worker, args=(2, _free_port(), logits, y, queue), nprocs=2, start_method="spawn")
    for _, results in sorted(queue.get(timeout=30) for _ in range(2)):
        for (value, bandwidth), single in zip(results, singles):
            # gathered order differs from the single-process order: equal up to summation round-off.
            assert value == pytest.approx(float(single.value), abs=1e-12)
            assert bandwidth == single.bandwidth


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("preds", "target", "kwargs", "match"),
    [
        (torch.randn(10), torch.zeros(10, dtype=torch.long), {}, "shape"),
        (torch.randn(10, 1), torch.zeros(10, dtype=torch.long), {}, "2 classes"),
        (torch.randn(10, 3), torch.zeros(9, dtype=torch.long), {}, "target"),
        (torch.randn(10, 3), torch.full((10,), 3), {}, r"\[0, 3\)"),
        (torch.randn(10, 3), torch.full((10,), -1), {}, r"\[0, 3\)"),
        (torch.randn(10, 3), torch.zeros(10), {}, "integer"),
        (torch.tensor([[float("nan"), 0.0]] * 3), torch.zeros(3, dtype=torch.long), {}, "non-finite"),
        (torch.randn(1, 3), torch.zeros(1, dtype=torch.long), {}, "at least 2 samples"),
        (torch.randn(10, 3), torch.zeros(10, dtype=torch.long), {"bandwidth": 0.0}, "bandwidth"),
        (torch.randn(10, 3), torch.zeros(10, dtype=torch.long), {"bandwidth": -1.0}, "bandwidth"),
        (torch.randn(10, 3), torch.zeros(10, dtype=torch.long), {"bandwidth_grid": []}, "bandwidth_grid"),
        (torch.randn(10, 3), torch.zeros(10, dtype=torch.long), {"block_size": 0}, "block_size"),
        (torch.randn(10, 3), torch.zeros(10, dtype=torch.long), {"input_type": "scores"}, "input_type"),
        (torch.rand(10, 3), torch.zeros(10, dtype=torch.long), {"input_type": "probs"}, "sum"),
        (torch.randn(10, 3), torch.zeros(10, dtype=torch.long), {"input_type": "probs"}, r"\[0, 1\]"),
    ],
)
def test_bad_input_raises(preds, target, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        kl_calibration_error(preds, target, **kwargs)


def test_metric_rejects_bad_input_early() -> None:
    with pytest.raises(ValueError, match="bandwidth"):
        KLCalibrationError(bandwidth=0)
    metric = KLCalibrationError()
    metric.update(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="classes"):
        metric.update(torch.randn(4, 5), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="non-finite"):
        metric.update(torch.full((2, 3), float("nan")), torch.zeros(2, dtype=torch.long))
    single = KLCalibrationError()
    single.update(torch.randn(1, 3), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="at least 2 samples"):
        single.compute()


# ------------------------------------------------------------------------ top-label and classwise variants
def _log_beta_density(x: float, a: float, b: float) -> float:
    return math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + (a - 1) * math.log(x) + (b - 1) * math.log1p(-x)


def _naive_binary(c: list[float], z: list[int], b: float) -> tuple[float, float, float]:
    """(mean binary KL(ĉ ‖ c), LOO log-likelihood of the Beta KDE of c, LOO log loss of ĉ), by double loops."""
    n = len(c)
    kl = loglik = loss = 0.0
    for i in range(n):
        logs = [_log_beta_density(c[i], c[j] / b + 1, (1 - c[j]) / b + 1) for j in range(n) if j != i]
        top = max(logs)
        weights = [math.exp(v - top) for v in logs]
        others = [z[j] for j in range(n) if j != i]
        hit = sum(w * o for w, o in zip(weights, others)) / sum(weights)
        loglik += top + math.log(sum(weights)) - math.log(n - 1)
        kl += sum(q * math.log(q / p) for q, p in ((hit, c[i]), (1 - hit, 1 - c[i])) if q > 0)
        own = hit if z[i] else 1 - hit
        loss -= math.log(own) if own > 0 else -math.inf
    return kl / n, loglik, loss


def _naive_variant(p: torch.Tensor, y: torch.Tensor, variant: str, b: float) -> float:
    if variant == "top_label":
        conf, top = p.max(1)
        return _naive_binary(conf.tolist(), (top == y).long().tolist(), b)[0]
    k = p.shape[1]
    return sum(_naive_binary(p[:, m].tolist(), (y == m).long().tolist(), b)[0] for m in range(k)) / k


def _naive_select(p: torch.Tensor, y: torch.Tensor, grid, rule: str) -> float:
    """Plain grid search on the top-label problem (the bandwidth both binary variants use)."""
    conf, top = p.max(1)
    scores = [_naive_binary(conf.tolist(), (top == y).long().tolist(), b) for b in grid]
    keys = [s[1] for s in scores] if rule == "likelihood" else [-s[2] for s in scores]
    return grid[max(range(len(grid)), key=lambda i: (keys[i], -i))]


@pytest.mark.parametrize("variant", ["top_label", "classwise"])
@pytest.mark.parametrize(("k", "bandwidth"), [(2, 0.05), (5, 0.2), (12, 0.01)])
def test_binary_variants_equal_direct_implementation(variant: str, k: int, bandwidth: float) -> None:
    p, y = _dirichlet_preds(30, k, seed=10 + k)
    expected = _naive_variant(p, y, variant, bandwidth)
    value, used = kl_calibration_error(p, y, "probs", bandwidth=bandwidth, block_size=7, variant=variant)
    assert used == bandwidth
    assert abs(float(value) - expected) <= 1e-10
    metric = KLCalibrationError(input_type="probs", bandwidth=bandwidth, variant=variant)
    metric.update(p[:11], y[:11])
    metric.update(p[11:], y[11:])
    assert abs(float(metric.compute()) - expected) <= 1e-10


@pytest.mark.parametrize("rule", ["likelihood", "label_loss"])
@pytest.mark.parametrize("variant", ["top_label", "classwise"])
def test_binary_bandwidth_selection_equals_grid_search(variant: str, rule: str) -> None:
    p, y = _dirichlet_preds(25, 4, seed=21, concentration=0.5)
    grid = [0.003, 0.01, 0.03, 0.1, 0.3, 1.0]
    expected_b = _naive_select(p, y, grid, rule)
    value, used = kl_calibration_error(
        p, y, "probs", bandwidth_grid=grid, block_size=4, variant=variant, bandwidth_rule=rule
    )
    assert used == expected_b
    assert abs(float(value) - _naive_variant(p, y, variant, expected_b)) <= 1e-10
    if rule == "likelihood":
        conf = p.max(1).values.double()
        fast = beta_loo_log_likelihood(conf.log(), (1 - conf).log(), grid, block_size=3)
        direct = [_naive_binary(conf.tolist(), [0] * len(conf), b)[1] for b in grid]
        assert torch.allclose(fast, torch.tensor(direct, dtype=torch.float64), rtol=0, atol=1e-9)


@pytest.mark.parametrize("singleton", [False, True])
def test_canonical_label_loss_rule_equals_grid_search(singleton: bool) -> None:
    p, y = _dirichlet_preds(30, 4, seed=8)
    y = y.clamp(max=2)
    if singleton:  # class 3 seen once: its sample's own-label estimate is 0 at every bandwidth
        y[5] = 3
    grid = [0.01, 0.05, 0.2, 1.0]
    losses = []
    for b in grid:
        kern = _naive_log_kernel(p, b).exp()
        own = torch.stack([kern[i, y == y[i]].sum() / kern[i].sum() for i in range(len(y))])
        losses.append((int((own == 0).sum()), float(-own[own > 0].log().sum())))
    assert all(z >= 1 for z, _ in losses) == singleton
    expected_b = grid[min(range(len(grid)), key=lambda i: losses[i])]
    value, used = kl_calibration_error(p, y, "probs", bandwidth_grid=grid, bandwidth_rule="label_loss")
    assert used == expected_b
    assert abs(float(value) - _naive_kl_ce(p, y, expected_b)[0]) <= 1e-10


def test_top_label_accepts_one_class_and_classwise_does_not() -> None:
    logits, y = torch.randn(6, 1), torch.zeros(6, dtype=torch.long)
    value, _ = kl_calibration_error(logits, y, variant="top_label")
    assert float(value) == 0.0
    with pytest.raises(ValueError, match="2 classes"):
        kl_calibration_error(logits, y, variant="classwise")
    with pytest.raises(ValueError, match="variant"):
        kl_calibration_error(torch.randn(6, 3), y, variant="marginal")
    with pytest.raises(ValueError, match="bandwidth_rule"):
        KLCalibrationError(bandwidth_rule="cv")
    with pytest.raises(ValueError, match="non-finite"):
        kl_calibration_error(torch.tensor([[float("nan"), 0.0]] * 3), y[:3], variant="top_label")
    with pytest.raises(ValueError, match="at least 2 samples"):
        kl_calibration_error(torch.randn(1, 3), y[:1], variant="classwise")


def test_extreme_confidences_stay_finite_in_binary_variants() -> None:
    logits = torch.tensor([[900.0, 0.0, -900.0], [0.0, 40.0, 1.0], [2.0, 1.0, 0.0], [0.0, 0.0, 60.0]] * 5)
    y = torch.tensor([0, 1, 2, 0] * 5)
    for variant in ("top_label", "classwise"):
        value, _ = kl_calibration_error(logits, y, variant=variant)
        assert torch.isfinite(value) and value > 0


def test_top_label_reads_calibration_at_imagenet_scale() -> None:
    # K = 1,000, n = 2,000: calibrated predictions read near 0, the same logits doubled read far higher
    # (the canonical estimate reads several nats on both).
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(2000, 1000, generator=g, dtype=torch.float64) * 2
    y = torch.multinomial(torch.softmax(logits, 1), 1, generator=g).squeeze(1)
    calibrated = float(kl_calibration_error(logits, y, variant="top_label").value)
    sharpened = float(kl_calibration_error(2 * logits, y, variant="top_label").value)
    assert 0 <= calibrated < 0.02
    assert sharpened >= 5 * calibrated and sharpened > 0.05
