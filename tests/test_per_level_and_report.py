"""PerLevelMetric, CE^max / relative reduction, and the calibration report (tables, JSON, PNGs)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from matplotlib.figure import Figure
from torchmetrics.classification import MulticlassAccuracy

from recalx_lightning.calibrators import BinnedTemperature, GlobalTemperature, SmoothTemperature
from recalx_lightning.metrics import (
    KLCalibrationError,
    NegativeLogLikelihood,
    PerLevelMetric,
    kl_calibration_error,
    max_over_levels,
    negative_log_likelihood,
    relative_reduction,
)
from recalx_lightning.report import evaluate_calibrators

TRUE_T = torch.tensor([1.0, 2.0, 4.0, 8.0], dtype=torch.float64)  # per level bin of 4


def _perturbed_data(n: int = 1200, k: int = 4, seed: int = 0):
    """Logits whose labels follow softmax(z / T(λ)): over-confident, more so at higher levels."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, generator=g, dtype=torch.float64) * 3
    levels = torch.randint(0, 21, (n,), generator=g).double() / 20
    bins = torch.clamp((levels * 4).long(), max=3)
    probs = torch.softmax(logits / TRUE_T[bins, None], 1)
    labels = torch.multinomial(probs, 1, generator=g).squeeze(1)
    return logits, labels, levels


def test_per_level_values_equal_metric_on_each_bin() -> None:
    logits, labels, levels = _perturbed_data(n=400)
    levels = levels.clamp(max=0.7)  # bin 3 of 4 ([0.75, 1]) stays empty
    wrapper = PerLevelMetric(NegativeLogLikelihood(), num_bins=4)
    wrapper.update(logits[:150], labels[:150], levels[:150])
    wrapper.update(logits[150:], labels[150:], levels[150:])
    values = wrapper.compute()
    bins = torch.clamp((levels * 4 + 1e-9).floor().long(), max=3)
    for b in range(3):
        assert float(values[b]) == pytest.approx(float(negative_log_likelihood(logits[bins == b], labels[bins == b])))
    assert math.isnan(values[3])
    assert wrapper.counts.tolist() == [int((bins == b).sum()) for b in range(4)]
    assert float(max_over_levels(values)) == pytest.approx(float(values[:3].max()))
    wrapper.reset()
    assert wrapper.counts.sum() == 0 and all(m.count == 0 for m in wrapper.metrics)


def test_per_level_kl_needs_two_samples_and_accepts_torchmetrics_templates() -> None:
    logits, labels, _ = _perturbed_data(n=30)
    levels = torch.cat([torch.zeros(29), torch.ones(1)]).double()
    kl = PerLevelMetric(KLCalibrationError(bandwidth=0.1), num_bins=2)
    kl.update(logits, labels, levels)
    values = kl.compute()
    assert float(values[0]) == pytest.approx(float(kl_calibration_error(logits[:29], labels[:29], bandwidth=0.1).value))
    assert math.isnan(values[1])  # a single sample: no leave-one-out estimate
    accuracy = PerLevelMetric(MulticlassAccuracy(num_classes=4, average="micro"), num_bins=4)
    accuracy.update(logits, labels, levels)  # bins 1 and 2 are empty: never updated
    values = accuracy.compute()
    expected = (logits[:29].argmax(1) == labels[:29]).double().mean()
    assert float(values[0]) == pytest.approx(float(expected), abs=1e-6)
    assert math.isnan(values[1]) and math.isnan(values[2]) and not math.isnan(values[3])


def test_per_level_bad_input() -> None:
    with pytest.raises(ValueError, match="torchmetrics.Metric"):
        PerLevelMetric(negative_log_likelihood)
    with pytest.raises(ValueError, match="num_bins"):
        PerLevelMetric(NegativeLogLikelihood(), num_bins=0)
    wrapper = PerLevelMetric(NegativeLogLikelihood(), num_bins=3)
    with pytest.raises(ValueError, match="levels"):
        wrapper.update(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), torch.tensor([0.1, 0.2, 1.5, 0.0]))
    with pytest.raises(ValueError, match="levels"):
        wrapper.update(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), torch.zeros(3))


def test_max_and_relative_reduction() -> None:
    assert float(max_over_levels(torch.tensor([0.1, float("nan"), 0.3]))) == pytest.approx(0.3)
    assert math.isnan(max_over_levels(torch.tensor([float("nan")])))
    assert float(relative_reduction(0.5, 0.02)) == pytest.approx(0.96)
    assert relative_reduction(torch.tensor([0.2, 0.0]), torch.tensor([0.3, 0.1]))[0] == pytest.approx(-0.5)
    assert math.isnan(relative_reduction(0.0, 0.1))
    with pytest.raises(ValueError, match="values"):
        max_over_levels(torch.zeros(2, 2))


@pytest.fixture(scope="module")
def report():
    logits, labels, levels = _perturbed_data()
    binned = BinnedTemperature(num_bins=4)
    binned.set_log_temperatures(TRUE_T.log())
    smooth = SmoothTemperature(num_bins=4)
    smooth.set_log_temperatures(TRUE_T.log())
    global_t = GlobalTemperature()
    global_t.set_log_temperatures(torch.tensor([math.log(3.0)]))
    calibrators = {"uncalibrated": None, "global": global_t, "binned": binned, "smooth": smooth}
    levels_for_report = levels.clone()
    return evaluate_calibrators(logits, labels, levels_for_report, calibrators, num_bins=4, ece_bins=10), (
        logits, labels, levels, binned)


def test_report_rows_match_independent_metrics(report) -> None:
    rep, (logits, labels, levels, binned) = report
    bins = torch.clamp((levels * 4 + 1e-9).floor().long(), max=3)
    for b in range(4):
        mask = bins == b
        scaled = logits[mask] / TRUE_T[b]
        row = rep.rows["binned"][b]
        assert row.samples == int(mask.sum())
        assert row.temperature == pytest.approx(float(TRUE_T[b]))
        assert row.accuracy == pytest.approx(float((scaled.argmax(1) == labels[mask]).double().mean()))
        assert row.nll == pytest.approx(float(negative_log_likelihood(scaled, labels[mask])))
        expected = kl_calibration_error(scaled, labels[mask])
        assert row.kl_ce == pytest.approx(float(expected.value), abs=1e-12)
        assert row.bandwidth == expected.bandwidth
        assert rep.rows["uncalibrated"][b].temperature == 1.0
        assert (row.level_low, row.level_high) == pytest.approx((b / 4, (b + 1) / 4))
        for variant, key in (("top_label", "kl_ce_top_label"), ("classwise", "kl_ce_classwise")):
            expected = kl_calibration_error(scaled, labels[mask], variant=variant)
            assert getattr(row, key) == pytest.approx(float(expected.value), abs=1e-12)


def test_report_floor_and_standard_error_follow_their_definitions(report) -> None:
    rep, (logits, labels, levels, binned) = report
    bins = torch.clamp((levels * 4 + 1e-9).floor().long(), max=3)
    generator = torch.Generator().manual_seed(0)  # the report's default seed, draws in the report's order
    for b in range(4):
        mask = bins == b
        scaled = logits[mask] / TRUE_T[b]
        row = rep.rows["binned"][b]
        for variant, key in (("canonical", "kl_ce"), ("top_label", "kl_ce_top_label"),
                             ("classwise", "kl_ce_classwise")):
            used = row.bandwidth if variant == "canonical" else getattr(row, f"bandwidth_{variant}")
            probs = torch.softmax(scaled, 1)
            floors = [float(kl_calibration_error(scaled, torch.multinomial(probs, 1, generator=generator)
                                                 .squeeze(1), variant=variant, bandwidth=used).value)
                      for _ in range(3)]
            n, half = row.samples, row.samples // 2
            halves = []
            for _ in range(4):
                pick = torch.randperm(n, generator=generator)[:half]
                halves.append(float(kl_calibration_error(scaled[pick], labels[mask][pick], variant=variant,
                                                         bandwidth=used).value))
            assert getattr(row, key + "_floor") == pytest.approx(sum(floors) / 3, abs=1e-12)
            assert getattr(row, key + "_se") == pytest.approx(
                float(torch.tensor(halves, dtype=torch.float64).std()) * math.sqrt(half / n), rel=1e-9)
            assert getattr(row, key + "_indistinguishable") in (True, False)
    # the generating temperatures calibrate each bin: the top-label error reads as calibrated in most bins,
    # while the uncalibrated predictions at the sharpest level do not.
    assert sum(r.kl_ce_top_label_indistinguishable for r in rep.rows["binned"]) >= 3
    assert not rep.rows["uncalibrated"][3].kl_ce_top_label_indistinguishable
    assert rep.rows["uncalibrated"][3].kl_ce_top_label > 5 * rep.rows["binned"][3].kl_ce_top_label


def test_true_temperatures_reduce_ce_max(report) -> None:
    rep, _ = report
    s = rep.summaries
    assert rep.reference == "uncalibrated"
    assert s["uncalibrated"].kl_ce_reduction == 0.0
    # the generating temperatures calibrate every bin; one global T cannot. (KL-CE at ~300 samples per bin
    # carries an upward bias of ~0.1-0.25 for these sharp predictions, so binned vs global is judged by ECE.)
    assert s["binned"].ece_max < s["global"].ece_max < s["uncalibrated"].ece_max
    assert max(s["binned"].kl_ce_max, s["global"].kl_ce_max) < 0.5 * s["uncalibrated"].kl_ce_max
    assert s["binned"].kl_ce_reduction > 0.5
    assert s["binned"].kl_ce_reduction == pytest.approx(
        (s["uncalibrated"].kl_ce_max - s["binned"].kl_ce_max) / s["uncalibrated"].kl_ce_max
    )
    ece_errors = [r.ece for r in rep.rows["uncalibrated"]]
    assert ece_errors[-1] > ece_errors[0]  # uncalibrated error grows with the level


def test_report_save_writes_json_markdown_and_pngs(report, tmp_path) -> None:
    rep, _ = report
    paths = rep.save(tmp_path, stem="run")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "run.json", "run.md", "run_error_vs_level.png", "run_reliability.png"
    ]
    data = json.loads(paths["json"].read_text())
    assert list(data["calibrators"]) == ["uncalibrated", "global", "binned", "smooth"]
    assert data["calibrators"]["binned"]["summary"]["kl_ce_max"] == pytest.approx(rep.summaries["binned"].kl_ce_max)
    assert len(data["calibrators"]["smooth"]["levels"]) == 4
    levels = data["calibrators"]["binned"]["levels"]
    for key in ("kl_ce", "kl_ce_top_label", "kl_ce_classwise"):
        assert all(isinstance(level[key], float) and isinstance(level[key + "_floor"], float)
                   and isinstance(level[key + "_se"], float) for level in levels)
        assert all(isinstance(level[key + "_bandwidth_at_edge"], bool) for level in levels)
    assert data["headline_variant"] == "top_label"
    summary = data["calibrators"]["binned"]["summary"]
    assert summary["kl_ce_top_label_max"] == pytest.approx(max(level["kl_ce_top_label"] for level in levels))
    markdown = paths["markdown"].read_text()
    assert "## binned" in markdown and "| [0.75, 1.00] |" in markdown
    assert "**≈0**" in markdown and "top-label KL-CE max" in markdown
    for key in ("error_vs_level", "reliability"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert isinstance(rep.figure_error_vs_level(), Figure)


def test_report_handles_empty_bins_and_bad_input(tmp_path) -> None:
    logits, labels, _ = _perturbed_data(n=60)
    levels = torch.zeros(60, dtype=torch.float64)
    rep = evaluate_calibrators(logits, labels, levels, {"none": None}, num_bins=3, bandwidth=0.1)
    assert rep.rows["none"][1].samples == 0 and math.isnan(rep.rows["none"][1].kl_ce)
    data = json.loads(json.dumps(rep.to_dict()))
    assert data["calibrators"]["none"]["levels"][2]["nll"] is None
    rep.save(tmp_path)
    with pytest.raises(ValueError, match="calibrators"):
        evaluate_calibrators(logits, labels, levels, {})
    with pytest.raises(ValueError, match="TemperatureCalibrator"):
        evaluate_calibrators(logits, labels, levels, {"x": torch.nn.Identity()})
    with pytest.raises(ValueError, match="reference"):
        evaluate_calibrators(logits, labels, levels, {"none": None}, reference="binned")
    with pytest.raises(ValueError, match="bandwidth"):
        evaluate_calibrators(logits, labels, levels, {"none": None}, bandwidth=-1.0)
    with pytest.raises(ValueError, match="levels"):
        evaluate_calibrators(logits, labels, levels + 2, {"none": None})
    with pytest.raises(ValueError, match="kl_variants"):
        evaluate_calibrators(logits, labels, levels, {"none": None}, kl_variants=["marginal"])
    with pytest.raises(ValueError, match="floor_resamples"):
        evaluate_calibrators(logits, labels, levels, {"none": None}, floor_resamples=-1)


def test_report_marks_bandwidth_at_grid_edge() -> None:
    logits, labels, levels = _perturbed_data(n=200)
    grid = [1e-6, 2e-6]  # far too small: the likelihood prefers the larger one, the grid's upper edge
    rep = evaluate_calibrators(logits, labels, levels, {"none": None}, num_bins=1, bandwidth_grid=grid,
                               kl_variants=["top_label"], floor_resamples=0, se_subsamples=0)
    row = rep.rows["none"][0]
    assert row.bandwidth_top_label == 2e-6 and row.kl_ce_top_label_bandwidth_at_edge
    assert math.isnan(row.kl_ce) and row.kl_ce_bandwidth_at_edge is None
    assert "†" in rep.to_markdown()
    fixed = evaluate_calibrators(logits, labels, levels, {"none": None}, num_bins=1, bandwidth=0.01,
                                 kl_variants=["top_label"], floor_resamples=0, se_subsamples=0)
    assert fixed.rows["none"][0].kl_ce_top_label_bandwidth_at_edge is None
