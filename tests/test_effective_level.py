"""The effective perturbation level: informative masks, levels, bin-filling sampling, fitting and explain."""

import itertools
import math

import lightning as L
import pytest
import torch
from torch import nn

from recalx_lightning import (
    BinnedTemperature,
    Perturbation,
    PerturbationDataModule,
    ReCalXModule,
    fit_temperatures,
)
from recalx_lightning.explain import METHODS, explain
from recalx_lightning.perturbation import level_to_bin, subset_generator
from tests.helpers import null_patch_setup, steep_binned


# ------------------------------------------------------------------------------------------ definitions
def naive_informative(x, perturbation):
    """Feature j is informative iff replacing it alone (keep all others) changes the input."""
    d = perturbation.num_features
    rows = []
    for i in range(x.shape[0]):
        keep = ~torch.eye(d, dtype=torch.bool)
        perturbed = perturbation.apply(x[i : i + 1], keep)
        rows.append((perturbed != x[i : i + 1]).flatten(1).any(1))
    return torch.stack(rows)


@pytest.mark.parametrize("baseline", ["zeros", "blur", "gaussian", "mean"])
def test_informative_mask_matches_single_feature_replacement(baseline):
    kwargs = {"channel_mean": [0.0, 0.5]} if baseline == "mean" else {}
    from recalx_lightning import make_baseline

    perturbation = Perturbation.patches(8, patch_size=2, baseline=make_baseline(baseline, **kwargs))
    x = torch.randn(3, 2, 8, 8)
    x[:, :, :4, :4] = 0.0  # zero in both channels: uninformative for zeros, not for mean (0.5 in channel 1)
    x[1] = 0.0
    x[2, 1, 4:6, 4:6] = 0.0  # one channel only: still informative for zeros
    informative = perturbation.informative(x)
    assert torch.equal(informative, naive_informative(x, perturbation))
    if baseline == "zeros":
        assert informative[0].sum() == 16 - 4 and informative[1].sum() == 0 and informative[2, 10]
    if baseline == "gaussian":
        assert informative.all()


def test_effective_level_formula_and_paper_equality():
    perturbation = Perturbation.tabular(5)
    keep = torch.tensor([[1, 0, 0, 1, 1], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    informative = torch.tensor([[True, True, False, False, True], [False] * 5, [True] * 5])
    assert perturbation.level(keep, informative).tolist() == [1 / 3, 1.0, 0.0]
    everything = torch.ones(1, 5, dtype=torch.bool)
    generator = torch.Generator().manual_seed(0)
    rows = torch.rand(200, 5, generator=generator) > 0.5
    assert torch.equal(perturbation.level(rows, everything), perturbation.level(rows))
    assert perturbation.informative_features(torch.randn(2, 5), "paper") is None
    with pytest.raises(ValueError, match="'paper'.*'effective'"):
        perturbation.informative_features(torch.randn(2, 5), "pixels")
    with pytest.raises(ValueError, match="informative"):
        perturbation.level(rows, everything[:, :4])


# ---------------------------------------------------------------------------------------------- sampling
def test_effective_sampling_fills_every_bin_and_is_seeded():
    perturbation = Perturbation.tabular(40)
    informative = torch.zeros(40, dtype=torch.bool)
    informative[::2] = True  # m = 20
    for b in range(10):
        keep = perturbation.sample_keep(300, b, 10, subset_generator(0, b), informative)
        levels = perturbation.level(keep, informative[None])
        assert (level_to_bin(levels, 10) == b).all()
        # the replaced informative count is uniform over the bin's integers (m = 20: 2 per bin, 3 in the last)
        counts = torch.bincount((levels * 20).round().long(), minlength=21)
        reachable = 3 if b == 9 else 2
        assert (counts > 0).sum() == reachable
        assert (counts[counts > 0].double() / 300 - 1 / reachable).abs().max() < 0.1
        # uninformative features are replaced too (they change nothing)
        assert (~keep[:, ~informative]).any()
    again = perturbation.sample_keep(300, 3, 10, subset_generator(0, 3), informative)
    assert torch.equal(again, perturbation.sample_keep(300, 3, 10, subset_generator(0, 3), informative))


def test_effective_sampling_with_every_feature_informative_is_the_papers():
    perturbation = Perturbation.tabular(12)
    everything = torch.ones(12, dtype=torch.bool)
    for b in (0, 4, 9):
        paper = perturbation.sample_keep(50, b, 10, subset_generator(1, b))
        assert torch.equal(paper, perturbation.sample_keep(50, b, 10, subset_generator(1, b), everything))


def test_effective_sampling_with_few_informative_features_uses_the_nearest_level():
    perturbation = Perturbation.tabular(30)
    informative = torch.zeros(30, dtype=torch.bool)
    informative[:3] = True  # m = 3: levels 0, 1/3, 2/3, 1 only
    reached = set()
    for b in range(10):
        keep = perturbation.sample_keep(20, b, 10, subset_generator(0, b), informative)
        levels = perturbation.level(keep, informative[None])
        assert levels.unique().numel() == 1
        nearest = min((0, 1 / 3, 2 / 3, 1), key=lambda v: abs(v - (b + 0.5) / 10))
        assert math.isclose(float(levels[0]), nearest) or level_to_bin(levels[:1], 10).item() == b
        reached.add(round(float(levels[0]), 6))
    assert reached == {0.0, round(1 / 3, 6), round(2 / 3, 6), 1.0}
    nothing = torch.zeros(30, dtype=torch.bool)
    keep = perturbation.sample_keep(10, 0, 10, subset_generator(0, 0), nothing)
    assert (perturbation.level(keep, nothing[None]) == 1).all()


def test_datamodule_effective_level_bins_by_each_images_informative_features():
    datamodule = PerturbationDataModule(dataset="digits", num_calibration_samples=6, num_eval_samples=4,
                                        subsets_per_bin=3, eval_subsets_per_bin=2, level="effective")
    datamodule.setup("fit")
    dataset = datamodule.datasets["calibration"]
    perturbation = datamodule.perturbation
    for item in range(len(dataset)):
        x, _, keep, index = dataset[item]
        informative = perturbation.informative(x[None])
        assert not informative.all()  # the black border of a digit
        levels = perturbation.level(keep, informative)
        expected_bins = torch.arange(10).repeat_interleave(3)
        assert torch.equal(level_to_bin(levels, 10), expected_bins)
        assert torch.equal(keep, dataset.keep_matrix(int(index)))  # same rows without the image at hand
    with pytest.raises(ValueError, match="data.level"):
        PerturbationDataModule(dataset="digits", level="exact")


def test_lightning_fit_on_the_effective_level_matches_an_independent_fit(tmp_path):
    def data(baseline):
        return PerturbationDataModule(dataset="wine", split="train", features="tabular", num_bins=5,
                                      subsets_per_bin=4, num_calibration_samples=12, num_eval_samples=10,
                                      eval_subsets_per_bin=6, batch_size=5, seed=3, level="effective",
                                      baseline=baseline)

    # a constant baseline equal to one entry of the first calibration row: that feature is uninformative there
    probe = data(0.0)
    probe.setup("fit")
    datamodule = data(float(probe.datasets["calibration"][0][0][0]))
    torch.manual_seed(0)
    module = ReCalXModule(model="mlp", model_kwargs={"in_features": 13, "num_classes": 3, "hidden_sizes": [16]},
                          num_bins=5, compare_calibrators=False)
    run = L.Trainer(max_epochs=1, num_sanity_val_steps=0, default_root_dir=tmp_path, enable_progress_bar=False,
                    logger=False, enable_checkpointing=False)
    run.fit(module, datamodule)
    assert module.level == "effective" and module.fitted_level == "effective"
    assert module.last_report.level == "effective"
    dataset = datamodule.datasets["calibration"]
    logits, labels, levels = [], [], []
    for i in range(len(dataset)):
        x, y, keep, _ = dataset[i]
        with torch.no_grad():
            logits.append(module.model(datamodule.perturbation.apply(x[None], keep)))
        labels.append(y.repeat(keep.shape[0]))
        levels.append(datamodule.perturbation.level(keep, datamodule.perturbation.informative(x[None])))
    assert not datamodule.perturbation.informative(dataset[0][0][None]).all()
    assert not torch.equal(levels[0], datamodule.perturbation.level(dataset[0][2]))
    expected = fit_temperatures(torch.cat(logits), torch.cat(labels), torch.cat(levels), "binned", num_bins=5)
    assert torch.allclose(module.calibrator.log_temperature, expected.calibrator.log_temperature, atol=1e-6)
    run.save_checkpoint(tmp_path / "effective.ckpt")
    assert torch.load(tmp_path / "effective.ckpt", weights_only=True)["level"] == "effective"
    paper_data = data(datamodule.hparams.baseline)
    paper_data.hparams.level = "paper"
    with pytest.raises(ValueError, match="level: checkpoint 'effective', this run 'paper'"):
        L.Trainer(logger=False, enable_progress_bar=False).validate(module, paper_data,
                                                                    ckpt_path=tmp_path / "effective.ckpt")


# ----------------------------------------------------------------------------------------------- explain
def oracle_effective_shapley(model, x, perturbation, calibrator, target):
    """Exact Shapley values of v(S) = softmax(f(x_S)/T(λ_eff(S; x)))_y by enumeration, λ_eff by hand."""
    d = perturbation.num_features
    informative = naive_informative(x, perturbation)
    phi = torch.zeros(x.shape[0], d, dtype=torch.float64)
    for i in range(x.shape[0]):
        m = int(informative[i].sum())

        def value(subset, i=i, m=m):
            keep = torch.zeros(1, d)
            keep[0, list(subset)] = 1
            with torch.no_grad():
                logits = model(perturbation.apply(x[i : i + 1], keep)).double()
            kept = sum(1 for j in subset if informative[i, j])
            level = torch.tensor([(m - kept) / m if m else 1.0], dtype=torch.float64)
            return float((logits / calibrator.temperature(level).detach()).softmax(-1)[0, int(target[i])])

        for j in range(d):
            others = [k for k in range(d) if k != j]
            for r in range(d):
                weight = math.factorial(r) * math.factorial(d - r - 1) / math.factorial(d)
                for subset in itertools.combinations(others, r):
                    phi[i, j] += weight * (value(tuple(sorted(subset + (j,)))) - value(subset))
    return phi


def test_effective_exact_shapley_matches_the_enumerated_game():
    model, x, perturbation = null_patch_setup(n=2)
    calibrator = steep_binned()
    target = torch.tensor([1, 3])
    result = explain(model, x, perturbation, calibrator, target, method="shapley_exact", level="effective")
    expected = oracle_effective_shapley(model, x, perturbation, calibrator, target)
    assert torch.allclose(result.attributions, expected, atol=1e-12)


@pytest.mark.parametrize("method", ["shapley_exact", "shapley_sampling", "kernel_shap"])
def test_a_feature_equal_to_the_baseline_gets_exactly_zero(method):
    model, x, perturbation = null_patch_setup(n=3)
    calibrator = steep_binned()
    plain = explain(model, x, perturbation, calibrator, method=method, level="effective", num_samples=40)
    assert (plain.attributions[:, 0] == 0).all()
    assert (plain.attributions[:, 1:] != 0).all()
    paper = explain(model, x, perturbation, calibrator, method=method, level="paper", num_samples=40)
    assert (paper.attributions[:, 0] != 0).all()  # the paper level's temperature switch


@pytest.mark.parametrize("method", ["shapley_exact", "shapley_sampling"])
def test_effective_shapley_is_efficient(method):
    model, x, perturbation = null_patch_setup(n=3)
    calibrator = steep_binned()
    result = explain(model, x, perturbation, calibrator, method=method, level="effective", num_samples=7)
    d = perturbation.num_features
    with torch.no_grad():
        full = model(x).double() / calibrator.temperature(torch.zeros(1, dtype=torch.float64))
        empty = model(perturbation.apply(x, torch.zeros(3, d))).double() / calibrator.temperature(
            torch.ones(1, dtype=torch.float64))
    target = result.targets[:, None]
    gap = full.softmax(-1).gather(1, target) - empty.softmax(-1).gather(1, target)
    assert torch.allclose(result.attributions.sum(1), gap.squeeze(1), atol=1e-10, rtol=0)


@pytest.mark.parametrize("mode", ["plain", "consistent"])
@pytest.mark.parametrize("method", METHODS)
def test_effective_equals_paper_bit_for_bit_when_every_feature_is_informative(method, mode):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 6), nn.Tanh(), nn.Linear(6, 3))
    perturbation = Perturbation(torch.tensor([[0, 0, 1, 2], [3, 3, 4, 4]]))
    x = torch.rand(2, 2, 2, 4) + 0.1  # never equal to the zero baseline
    calibrator = BinnedTemperature(10)
    calibrator.set_log_temperatures(torch.linspace(-0.5, 2.0, 10, dtype=torch.float64))
    kwargs = dict(method=method, mode=mode, num_samples=30, seed=4)
    paper = explain(model, x, perturbation, calibrator, **kwargs)
    effective = explain(model, x, perturbation, calibrator, level="effective", **kwargs)
    assert torch.equal(paper.attributions, effective.attributions)
    assert paper.shared_temperature == effective.shared_temperature


@pytest.mark.parametrize("method", METHODS)
def test_every_method_and_mode_runs_on_the_effective_level(method):
    model, x, perturbation = null_patch_setup(n=2)
    calibrator = steep_binned()
    for mode in ("plain", "consistent"):
        result = explain(model, x, perturbation, calibrator, method=method, mode=mode, level="effective",
                         num_samples=30)
        assert torch.isfinite(result.attributions).all()
        assert (result.attributions[:, 0] == 0).all()
    with pytest.raises(ValueError, match="`level`"):
        explain(model, x, perturbation, calibrator, method=method, level="paperish")
