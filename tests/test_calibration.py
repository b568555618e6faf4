"""The Lightning-free pipeline: split seeds, keep rows, cache joining, and `calibrate`/`evaluate` against the CLI."""

import json
from pathlib import Path

import pytest
import torch

from recalx_lightning import BinnedTemperature, Perturbation, fit_temperatures
from recalx_lightning.calibration import (
    PerturbedImages,
    calibrate,
    collect,
    draw_keep,
    evaluate,
    join_cache,
    levels_under,
    split_samples,
    split_seed,
)
from recalx_lightning.data import make_dataset
from recalx_lightning.lightning.cli import main
from recalx_lightning.models import create_model
from recalx_lightning.perturbation import subset_generator

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")


def test_split_seeds_are_distinct_and_named():
    seeds = {split_seed(3, split) for split in ("calibration", "evaluation", "test")}
    assert seeds == {3 * 7919, 3 * 7919 + 1, 3 * 7919 + 2}
    with pytest.raises(ValueError, match="`split` must be one of"):
        split_seed(0, "train")


def test_split_samples_are_disjoint_sorted_and_seeded():
    calibration, evaluation = split_samples(50, 10, 15, seed=4)
    order = torch.randperm(50, generator=torch.Generator().manual_seed(4)).tolist()
    assert calibration == sorted(order[:10]) and evaluation == sorted(order[10:25])
    with pytest.raises(ValueError, match="num_calibration_samples \\+ num_eval_samples = 60"):
        split_samples(50, 30, 30)


def test_draw_keep_is_one_generator_per_sample_bin_major():
    perturbation = Perturbation.tabular(12, "zeros")
    keep = draw_keep(perturbation, index=7, num_bins=4, subsets_per_bin=3, seed=11)
    generator = subset_generator(11, 7)
    expected = torch.cat([perturbation.sample_keep(3, b, 4, generator) for b in range(4)])
    assert keep.shape == (12, 12) and torch.equal(keep, expected)
    images = PerturbedImages(torch.utils.data.TensorDataset(torch.randn(9, 12), torch.zeros(9)), [7], perturbation,
                             4, 3, seed=11)
    assert torch.equal(images[0][2], keep)


def test_join_cache_deduplicates_and_sorts_by_index():
    parts = [{"index": torch.tensor([3, 1]), "logits": torch.tensor([[3.0], [1.0]])},
             {"index": torch.tensor([2, 3]), "logits": torch.tensor([[2.0], [9.0]])}]
    cache = join_cache(parts)
    assert cache["index"].tolist() == [1, 2, 3] and cache["logits"].flatten().tolist() == [1.0, 2.0, 3.0]


def test_levels_under_gives_both_level_definitions_of_the_collected_samples():
    torch.manual_seed(0)
    x = torch.randn(9, 8)
    x[:, :3] = 0  # zero baseline: the first three features are never informative
    x[4, 3:6] = 0
    perturbation = Perturbation.tabular(8, "zeros")
    images = PerturbedImages(torch.utils.data.TensorDataset(x, torch.zeros(9, dtype=torch.long)), [7, 2, 4],
                             perturbation, 4, 3, seed=5, level="effective")
    cache = collect(torch.nn.Linear(8, 3), images, batch_size=2, progress=False)
    assert cache["index"].tolist() == [2, 4, 7]
    assert torch.equal(levels_under(images, cache, "effective"), cache["levels"])
    paper = levels_under(images, cache, "paper")
    for row, index in enumerate(cache["index"].tolist()):
        keep = images[images.indices.index(index)][2]
        informative = x[index] != 0
        assert torch.equal(paper[row], 1 - keep.double().sum(1) / 8)  # naive (d − |S|) / d
        naive = (informative & ~keep).double().sum(1) / informative.double().sum()
        assert torch.allclose(cache["levels"][row], naive, rtol=0, atol=1e-15)
    assert not torch.equal(paper, cache["levels"])


def test_calibrate_fits_what_fit_temperatures_fits_on_its_cache():
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    inputs = torch.randn(40, 6)
    with torch.no_grad():
        labels = torch.where(torch.rand(40) < 0.7, model(inputs).argmax(1), torch.randint(0, 3, (40,)))
    data = torch.utils.data.TensorDataset(inputs, labels)
    perturbation = Perturbation.tabular(6, "zeros")
    result = calibrate(model, data, perturbation, calibrators=("binned", "global"), num_bins=3, subsets_per_bin=4,
                       progress=False)
    logits = result.cache["logits"].reshape(-1, 3)
    labels = result.cache["labels"].repeat_interleave(12)
    levels = result.cache["levels"].reshape(-1)
    independent = fit_temperatures(logits, labels, levels, BinnedTemperature(3)).calibrator
    assert torch.allclose(result.calibrators["binned"].temperatures, independent.temperatures, rtol=0, atol=1e-12)
    with torch.no_grad():
        clean = model(inputs)
    torch.testing.assert_close(result.cache["clean"], clean)
    assert result.calibrator is result.calibrators["binned"]


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        (dict(calibrators=("binned", "bogus")), "`calibrators` must be distinct names"),
        (dict(fit_method="bfgs"), "`fit_method` must be 'auto', 'newton' or 'lbfgs'"),
        (dict(subsets_per_bin=0), "`subsets_per_bin` must be an integer >= 1"),
        (dict(indices=[]), "`indices` selects no samples"),
    ],
)
def test_calibrate_refuses_bad_options_before_any_forward(kwargs, pattern):
    calls = []

    def model(x):
        calls.append(x.shape[0])
        return torch.zeros(x.shape[0], 2)

    data = torch.utils.data.TensorDataset(torch.randn(5, 4), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=pattern):
        calibrate(model, data, Perturbation.tabular(4, "zeros"), num_bins=2, progress=False, **kwargs)
    assert calls == []


def test_cli_fit_and_calibrate_give_identical_temperatures_and_report(tmp_path):
    """`python -m recalx_lightning fit` on configs/digits.yaml and calibrate() + evaluate() with the same settings
    give the same temperatures and the same report numbers; the published calibration study fits the same
    temperatures for the same N and M."""
    num_calibration, num_evaluation, subsets, eval_subsets = 30, 30, 3, 2
    main([
        "fit", "--config", str(ROOT / "configs" / "digits.yaml"),
        "--data.init_args.num_calibration_samples", str(num_calibration),
        "--data.init_args.num_eval_samples", str(num_evaluation),
        "--data.init_args.subsets_per_bin", str(subsets), "--data.init_args.eval_subsets_per_bin", str(eval_subsets),
        "--trainer.callbacks", "[]", "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    ])
    run = tmp_path / "digits" / "version_0"
    cli_diagnostics = json.loads((run / "fit_diagnostics.json").read_text())
    cli_report = json.loads((run / "calibration_report.json").read_text())

    model = create_model("reference:digits_cnn").eval()
    dataset = make_dataset("digits", "val")
    perturbation = Perturbation.patches(image_size=32, patch_size=4, baseline="zeros")
    calibration_indices, evaluation_indices = split_samples(len(dataset), num_calibration, num_evaluation, seed=0)
    result = calibrate(model, dataset, perturbation, calibrators=("global", "binned", "smooth"),
                       subsets_per_bin=subsets, indices=calibration_indices, seed=0, progress=False)
    report = evaluate(model, dataset, perturbation, result.calibrators, subsets_per_bin=eval_subsets,
                      indices=evaluation_indices, seed=0, progress=False)

    assert set(cli_diagnostics) == set(result.temperatures)
    for kind, temperatures in result.temperatures.items():
        assert cli_diagnostics[kind]["temperatures"] == temperatures, kind
    assert json.loads(json.dumps(report.to_dict())) == cli_report

    # the published study (benchmarks/results_calibration.py, digits_cnn setting) with the same N and M
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import results_calibration as study
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    setting = next(s for s in study.SETTINGS if s.name == "digits_cnn")
    published = study.run_setting(setting, True, tmp_path, plan={"n_cal": num_calibration, "m_cal": subsets,
                                                                 "n_eval": 360, "m_eval": 1})
    for kind, temperatures in published["temperatures"].items():
        assert cli_diagnostics[kind]["temperatures"] == temperatures, kind
