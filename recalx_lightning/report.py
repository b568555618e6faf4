"""Calibration report: every calibrator evaluated per perturbation-level bin, as JSON, Markdown and PNG.

>>> report = evaluate_calibrators(logits, labels, levels, {"uncalibrated": None, "binned": binned})
>>> report.save("logs/run")          # calibration_report.json / .md / _error_vs_level.png / _reliability.png
>>> figure = report.figure_error_vs_level()     # e.g. for TensorBoard's add_figure

Per calibrator and level bin [b/B, (b+1)/B): samples, accuracy, NLL, top-label ECE, the KL calibration error
in three variants (``kl_ce`` canonical, ``kl_ce_top_label``, ``kl_ce_classwise``, each with its bandwidth), the
mean temperature T(λ) over the bin's samples, and the reliability-diagram statistics. Per calibrator: CE^max =
max over bins of each KL-CE variant (the paper's headline number), ECE^max, and their relative reductions
against a reference calibrator (the uncalibrated model by default).

Every KL-CE value ``v`` comes with

- ``v_floor``: the same estimator (same bandwidth) on labels resampled from the predictions themselves, whose
  true calibration error is 0; the mean of ``floor_resamples`` draws. It measures the estimator's own bias at
  this bin's n, K and confidence profile.
- ``v_se``: a subsampling standard error: the spread of the estimator on ``se_subsamples`` random halves of the
  bin, times √(1/2) (cost ≈ one estimate in all, since the cost grows with n²).
- ``v_indistinguishable``: True when v ≤ floor + 2·√(se² + sd_floor² / R), i.e. within two standard errors of
  what perfectly calibrated predictions read (sd_floor: spread of the R floor draws).
- ``v_bandwidth_at_edge``: True when the bandwidth was selected and is the smallest or largest grid value (the
  optimum may lie outside the grid; marked † in Markdown).

``headline_variant`` names the variant the summary leads with: ``top_label`` (the estimator-error study,
``benchmarks/study_kl_estimator_error.py``, shows the canonical estimate is dominated by its bias beyond a few
classes, while the top-label one is near its truth at every K); the canonical numbers stay next to it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from recalx_lightning._checks import check_labels, check_levels, check_logits, check_positive_int
from recalx_lightning._format import fmt
from recalx_lightning.calibrators import TemperatureCalibrator, scale_logits
from recalx_lightning.metrics._inputs import log_probabilities
from recalx_lightning.metrics.classification import _ece_from_bins, _nll_terms, reliability_bins
from recalx_lightning.metrics.kl_calibration import (
    DEFAULT_BANDWIDTHS,
    VARIANTS,
    _check_bandwidths,
    kl_calibration_error,
)
from recalx_lightning.metrics.per_level import max_over_levels, relative_reduction
from recalx_lightning.perturbation import LevelKind, bin_edges, check_level, level_to_bin

_LEVEL_NAMES = {"paper": "perturbation level λ", "effective": "effective perturbation level λ_eff"}

_NAN = float("nan")
#: Report field of each KL-CE variant.
VARIANT_KEYS = {"canonical": "kl_ce", "top_label": "kl_ce_top_label", "classwise": "kl_ce_classwise"}
_BANDWIDTH_KEYS = {"canonical": "bandwidth", "top_label": "bandwidth_top_label", "classwise": "bandwidth_classwise"}
#: The variant the summary leads with (see the module docstring).
HEADLINE_VARIANT = "top_label"
#: Classwise KL-CE costs K·n² kernel entries: by default it is computed up to this many classes.
CLASSWISE_MAX_CLASSES = 100


@dataclass
class LevelRow:
    """Metrics of one calibrator on one level bin (NaN where the bin has too few samples)."""

    level_low: float
    level_high: float
    samples: int
    accuracy: float = _NAN
    nll: float = _NAN
    ece: float = _NAN
    kl_ce: float = _NAN
    bandwidth: float = _NAN
    kl_ce_floor: float = _NAN
    kl_ce_se: float = _NAN
    kl_ce_indistinguishable: bool | None = None
    kl_ce_bandwidth_at_edge: bool | None = None
    kl_ce_top_label: float = _NAN
    bandwidth_top_label: float = _NAN
    kl_ce_top_label_floor: float = _NAN
    kl_ce_top_label_se: float = _NAN
    kl_ce_top_label_indistinguishable: bool | None = None
    kl_ce_top_label_bandwidth_at_edge: bool | None = None
    kl_ce_classwise: float = _NAN
    bandwidth_classwise: float = _NAN
    kl_ce_classwise_floor: float = _NAN
    kl_ce_classwise_se: float = _NAN
    kl_ce_classwise_indistinguishable: bool | None = None
    kl_ce_classwise_bandwidth_at_edge: bool | None = None
    temperature: float = _NAN
    reliability_count: list[float] = field(default_factory=list)
    reliability_confidence: list[float] = field(default_factory=list)
    reliability_accuracy: list[float] = field(default_factory=list)


@dataclass
class CalibratorSummary:
    """Level-wise maxima of one calibrator and their relative reductions against the reference."""

    kl_ce_max: float
    ece_max: float
    kl_ce_reduction: float
    ece_reduction: float
    kl_ce_top_label_max: float = _NAN
    kl_ce_top_label_reduction: float = _NAN
    kl_ce_classwise_max: float = _NAN
    kl_ce_classwise_reduction: float = _NAN


class CalibrationReport:
    """Per-level metrics of several calibrators on one set of perturbed samples (see the module docstring).

    Attributes:
        rows: ``{calibrator name: [LevelRow per level bin]}``.
        summaries: ``{calibrator name: CalibratorSummary}``.
        reference: name of the calibrator that reductions are measured against.
        level: the level definition the bins are made of (``"paper"`` λ or ``"effective"`` λ_eff).
    """

    def __init__(
        self,
        rows: dict[str, list[LevelRow]],
        num_bins: int,
        ece_bins: int,
        reference: str,
        level: str = "paper",
    ) -> None:
        self.rows, self.num_bins, self.ece_bins, self.reference = rows, num_bins, ece_bins, reference
        self.level = check_level(level)
        self.headline_variant = HEADLINE_VARIANT
        keys = ("kl_ce", "ece", *(VARIANT_KEYS[v] for v in ("top_label", "classwise")))
        maxima = {
            name: {
                key: float(max_over_levels(torch.tensor([getattr(r, key) for r in block], dtype=torch.float64)))
                for key in keys
            }
            for name, block in rows.items()
        }
        reduction = {
            name: {key: float(relative_reduction(maxima[reference][key], m[key])) for key in keys}
            for name, m in maxima.items()
        }
        self.summaries = {
            name: CalibratorSummary(
                m["kl_ce"], m["ece"], reduction[name]["kl_ce"], reduction[name]["ece"],
                m["kl_ce_top_label"], reduction[name]["kl_ce_top_label"],
                m["kl_ce_classwise"], reduction[name]["kl_ce_classwise"],
            )
            for name, m in maxima.items()
        }

    # ------------------------------------------------------------------------------------------ tables
    def to_dict(self) -> dict[str, Any]:
        """Everything as plain JSON types (NaN → None)."""
        return _nan_to_none(
            {
                "num_bins": self.num_bins,
                "ece_bins": self.ece_bins,
                "reference": self.reference,
                "level": self.level,
                "headline_variant": self.headline_variant,
                "calibrators": {
                    name: {"summary": asdict(self.summaries[name]), "levels": [asdict(r) for r in block]}
                    for name, block in self.rows.items()
                },
            }
        )

    def to_markdown(self) -> str:
        """A summary table (CE^max and reductions per variant) and one per-level table per calibrator."""
        head = VARIANT_KEYS[self.headline_variant]
        lines = [
            "# Calibration report",
            "",
            f"{self.num_bins} bins of the {_LEVEL_NAMES[self.level]}; ECE with {self.ece_bins} equal-width "
            "confidence bins; KL-CE by leave-one-out kernel regression: top-label (Beta kernel, confidence vs "
            "correctness; the headline), canonical (Dirichlet kernel, K-way label) and classwise (Beta kernel "
            "per class). Reductions are "
            f"relative to `{self.reference}`.",
            "",
            "| calibrator | top-label KL-CE max | reduction | canonical KL-CE max | reduction | classwise KL-CE max "
            "| reduction | ECE max | reduction |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, s in self.summaries.items():
            lines.append(
                f"| {name} | {fmt(getattr(s, head + '_max'))} | {_pct(getattr(s, head + '_reduction'))} | "
                f"{fmt(s.kl_ce_max)} | {_pct(s.kl_ce_reduction)} | {fmt(s.kl_ce_classwise_max)} | "
                f"{_pct(s.kl_ce_classwise_reduction)} | {fmt(s.ece_max)} | {_pct(s.ece_reduction)} |"
            )
        lines += [
            "",
            "Per level: each KL-CE as value ± standard error [floor]; **≈0** marks a value indistinguishable "
            "from calibrated (within two standard errors of the floor, the estimator's reading on labels drawn "
            "from the predictions themselves); † a selected bandwidth at the edge of its grid.",
        ]
        header = "| level | samples | accuracy | NLL | ECE | KL-CE top-label | KL-CE canonical | KL-CE classwise | T |"
        for name, block in self.rows.items():
            lines += ["", f"## {name}", "", header, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for r in block:
                closing = "]" if r.level_high >= 1.0 else ")"
                cells = " | ".join(_kl_cell(r, VARIANT_KEYS[v]) for v in ("top_label", "canonical", "classwise"))
                lines.append(
                    f"| [{r.level_low:.2f}, {r.level_high:.2f}{closing} | {r.samples} | {fmt(r.accuracy)} | "
                    f"{fmt(r.nll)} | {fmt(r.ece)} | {cells} | {fmt(r.temperature, '.3g')} |"
                )
        return "\n".join(lines) + "\n"

    def save(self, directory: str | Path, stem: str = "calibration_report") -> dict[str, Path]:
        """Write ``<stem>.json``, ``<stem>.md``, ``<stem>_error_vs_level.png`` and ``<stem>_reliability.png``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = {
            "json": directory / f"{stem}.json",
            "markdown": directory / f"{stem}.md",
            "error_vs_level": directory / f"{stem}_error_vs_level.png",
            "reliability": directory / f"{stem}_reliability.png",
        }
        paths["json"].write_text(json.dumps(self.to_dict(), indent=2))
        paths["markdown"].write_text(self.to_markdown())
        for key, make in (("error_vs_level", self.figure_error_vs_level), ("reliability", self.figure_reliability)):
            make().savefig(paths[key], dpi=110)
        return paths

    # ------------------------------------------------------------------------------------------ figures
    def figure_error_vs_level(self):
        """KL-CE, ECE and temperature against the level bin centre, one line per calibrator (paper Fig. 1)."""
        from matplotlib.ticker import FormatStrFormatter

        figure, axes = _subplots(1, 5, (22, 3.8))
        centres = [(r.level_low + r.level_high) / 2 for r in next(iter(self.rows.values()))]
        panels = (
            ("kl_ce_top_label", "top-label KL-CE (± SE; dotted: floor)"),
            ("kl_ce", "canonical KL-CE (± SE; dotted: floor)"),
            ("kl_ce_classwise", "classwise KL-CE (± SE; dotted: floor)"),
            ("ece", "top-label ECE"),
            ("temperature", "temperature T"),
        )
        for axis, (key, title) in zip(axes, panels):
            for name, block in self.rows.items():
                values = [getattr(r, key) for r in block]
                if key.startswith("kl_ce"):
                    errors = [getattr(r, key + "_se") for r in block]
                    line = axis.errorbar(centres, values, yerr=errors, marker="o", label=name, capsize=2)[0]
                    axis.plot(centres, [getattr(r, key + "_floor") for r in block], linestyle=":",
                              color=line.get_color())
                else:
                    axis.plot(centres, values, marker="o", label=name)
            axis.set_title(title, fontsize=9)
            axis.set_xlabel(f"{_LEVEL_NAMES[self.level]} (bin centre)")
            axis.set_xlim(0, 1)
            axis.grid(alpha=0.3)
        axes[-1].set_yscale("log")
        axes[-1].yaxis.set_major_formatter(FormatStrFormatter("%g"))
        axes[-1].yaxis.set_minor_formatter(FormatStrFormatter("%g"))
        axes[0].legend()
        figure.tight_layout()
        return figure

    def figure_reliability(self):
        """Top-label reliability diagrams, one panel per level bin: accuracy against mean confidence in
        ``ece_bins`` confidence bins (readable at any K, e.g. 1,000 classes), with the share of samples in each
        confidence bin as steps on the right axis."""
        columns = min(self.num_bins, 5)
        rows = math.ceil(self.num_bins / columns)
        figure, axes = _subplots(rows, columns, (3.0 * columns, 3.0 * rows + 0.4), squeeze=False)
        edges = torch.linspace(0, 1, self.ece_bins + 1).tolist()
        for index, axis in enumerate(axes.flat):
            if index >= self.num_bins:
                axis.axis("off")
                continue
            axis.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
            shares = axis.twinx()
            for color, (name, block) in enumerate(self.rows.items()):
                row = block[index]
                points = [
                    (c, a) for n, c, a in zip(row.reliability_count, row.reliability_confidence,
                                              row.reliability_accuracy) if n > 0
                ]
                if points:
                    axis.plot(*zip(*points), marker=".", label=name, color=f"C{color}")
                total = sum(row.reliability_count)
                if total > 0 and len(row.reliability_count) == self.ece_bins:
                    shares.stairs([n / total for n in row.reliability_count], edges, color=f"C{color}",
                                  alpha=0.15, fill=True)
            shares.set_ylim(0, 1)
            shares.tick_params(labelsize=6, colors="grey")
            if index % columns == columns - 1 or index == self.num_bins - 1:
                shares.set_ylabel("share of samples", fontsize=7, color="grey")
            else:
                shares.set_yticklabels([])
            first = next(iter(self.rows.values()))[index]
            axis.set_title(f"λ ∈ [{first.level_low:.2g}, {first.level_high:.2g}), n = {first.samples}", fontsize=9)
            axis.set_xlim(0, 1)
            axis.set_ylim(0, 1)
            axis.tick_params(labelsize=7)
            if index % columns == 0:
                axis.set_ylabel("accuracy")
            if index >= (rows - 1) * columns:
                axis.set_xlabel("confidence")
        handles, labels = axes.flat[0].get_legend_handles_labels()
        figure.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False)
        figure.tight_layout(rect=(0, 0.05, 1, 1))
        return figure


def _subplots(rows: int, columns: int, size: tuple[float, float], squeeze: bool = True):
    """A pyplot-free Figure: rendered by Agg, safe in headless training processes, never shown."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=size)
    return figure, figure.subplots(rows, columns, squeeze=squeeze)


def _kl_cell(row: LevelRow, key: str) -> str:
    value = getattr(row, key)
    if value is None or math.isnan(value):
        return "–"
    text = f"{value:.4f} ± {fmt(getattr(row, key + '_se'))} [{fmt(getattr(row, key + '_floor'))}]"
    if getattr(row, key + "_indistinguishable"):
        text += " **≈0**"
    return text + (" †" if getattr(row, key + "_bandwidth_at_edge") else "")


def _pct(value: float) -> str:
    return fmt(100 * value, ".1f", "%")


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return value


def _kl_with_uncertainty(
    row: LevelRow, scaled: Tensor, labels: Tensor, variant: str, kl_args: dict, uncertainty: dict,
    generator: torch.Generator,
) -> None:
    """Fill the value, bandwidth, floor, standard error and flags of one KL-CE variant (module docstring)."""
    key = VARIANT_KEYS[variant]
    result = kl_calibration_error(scaled, labels, "logits", variant=variant, **kl_args)
    setattr(row, key, float(result.value))
    setattr(row, _BANDWIDTH_KEYS[variant], result.bandwidth)
    fixed = {**kl_args, "bandwidth": result.bandwidth} if math.isfinite(result.bandwidth) else kl_args
    if kl_args["bandwidth"] is None and math.isfinite(result.bandwidth):
        grid = kl_args["bandwidth_grid"] or DEFAULT_BANDWIDTHS
        setattr(row, key + "_bandwidth_at_edge", result.bandwidth in (min(grid), max(grid)))
    probs = torch.softmax(scaled.double(), 1)
    floors = []
    for _ in range(uncertainty["floor_resamples"]):
        drawn = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(labels.device)
        floors.append(float(kl_calibration_error(scaled, drawn, "logits", variant=variant, **fixed).value))
    half = row.samples // 2
    halves = []
    if half >= 2:
        for _ in range(uncertainty["se_subsamples"]):
            pick = torch.randperm(row.samples, generator=generator)[:half].to(labels.device)
            value = kl_calibration_error(scaled[pick], labels[pick], "logits", variant=variant, **fixed).value
            halves.append(float(value))
    floor = _mean(floors)
    se = _std(halves) * math.sqrt(half / row.samples) if len(halves) >= 2 else _NAN
    setattr(row, key + "_floor", floor)
    setattr(row, key + "_se", se)
    if floors and not math.isnan(se):
        spread = _std(floors) if len(floors) >= 2 else 0.0
        margin = 2 * math.sqrt(se**2 + spread**2 / len(floors))
        setattr(row, key + "_indistinguishable", float(result.value) <= floor + margin)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else _NAN


def _std(values: list[float]) -> float:
    if len(values) < 2:
        return _NAN
    mean = _mean(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _evaluate_bin(
    scaled: Tensor, labels: Tensor, temperature: Tensor, low: float, high: float, ece_bins: int, kl_args: dict,
    variants: Sequence[str], uncertainty: dict, generator: torch.Generator,
) -> LevelRow:
    row = LevelRow(low, high, int(labels.numel()))
    if row.samples == 0:
        return row
    log_probs = log_probabilities(scaled, "logits")
    stats = reliability_bins(log_probs, labels, ece_bins)
    row.accuracy = float(stats.correct_sum.sum() / row.samples)
    row.nll = float(_nll_terms(log_probs, labels).mean())
    row.ece = float(_ece_from_bins(stats, "l1"))
    row.temperature = float(temperature.mean())
    row.reliability_count = stats.count.tolist()
    row.reliability_confidence = (stats.confidence_sum / stats.count).tolist()
    row.reliability_accuracy = (stats.correct_sum / stats.count).tolist()
    if row.samples >= 2:
        for variant in variants:
            _kl_with_uncertainty(row, scaled, labels, variant, kl_args, uncertainty, generator)
    return row


REPORT_OPTIONS = ("ece_bins", "bandwidth", "bandwidth_grid", "block_size", "kl_variants", "floor_resamples",
                  "se_subsamples")


def check_report_options(options: Mapping[str, Any], name: str | None = None) -> None:
    """Check options of :func:`evaluate_calibrators` (any of :data:`REPORT_OPTIONS`) before any work; ``name``:
    the dict they came in (e.g. ``report_options``), named in the messages."""
    prefix = f"{name}." if name else ""
    unknown = sorted(set(options) - set(REPORT_OPTIONS))
    if unknown:
        raise ValueError(f"`{name or 'options'}` has unknown keys {unknown}; choose from {list(REPORT_OPTIONS)}.")
    if options.get("ece_bins") is not None:
        check_positive_int(options["ece_bins"], f"{prefix}ece_bins")
    _check_bandwidths(options.get("bandwidth"), options.get("bandwidth_grid"))
    if options.get("block_size") is not None:
        check_positive_int(options["block_size"], f"{prefix}block_size")
    kl_variants = options.get("kl_variants")
    if kl_variants is not None and (isinstance(kl_variants, str) or not kl_variants
                                    or any(v not in VARIANTS for v in kl_variants)):
        raise ValueError(f"`{prefix}kl_variants` must be a non-empty subset of {list(VARIANTS)}, "
                         f"got {kl_variants!r}.")
    for key in ("floor_resamples", "se_subsamples"):
        value = options.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"`{prefix}{key}` must be an integer >= 0, got {value!r}.")


@torch.no_grad()
def evaluate_calibrators(
    logits: Tensor,
    labels: Tensor,
    levels: Tensor,
    calibrators: Mapping[str, TemperatureCalibrator | None],
    num_bins: int = 10,
    ece_bins: int = 15,
    bandwidth: float | None = None,
    bandwidth_grid: Sequence[float] | None = None,
    block_size: int | None = None,
    reference: str | None = None,
    level: LevelKind = "paper",
    kl_variants: Sequence[str] | None = None,
    floor_resamples: int = 3,
    se_subsamples: int = 4,
    seed: int = 0,
) -> CalibrationReport:
    """Evaluate each calibrator on every level bin of the perturbed samples.

    Args:
        logits: (n, K) uncalibrated logits of perturbed inputs.
        labels: (n,) class indices.
        levels: (n,) perturbation levels λ ∈ [0, 1] of the inputs.
        calibrators: ``{name: calibrator}``; ``None`` means uncalibrated (T = 1). Order is kept in tables.
        num_bins: B level bins of the report (independent of the calibrators' own bins).
        ece_bins: confidence bins of the top-label ECE and the reliability diagrams.
        bandwidth, bandwidth_grid, block_size: passed to
            :func:`~recalx_lightning.metrics.kl_calibration_error` (bandwidth chosen per calibrator and bin
            unless given).
        reference: calibrator that reductions are relative to; default the first ``None`` entry, else the
            first entry.
        level: which level definition ``levels`` hold (``"paper"`` or ``"effective"``), recorded in the report
            and its tables/figures; compute the levels with ``Perturbation.level`` for that definition.
        kl_variants: KL-CE variants to compute (others are reported as NaN); default all three, without
            ``classwise`` above ``CLASSWISE_MAX_CLASSES`` = 100 classes (its cost is K·n²).
        floor_resamples: label draws from the predictions per floor (R; 0 disables the floor).
        se_subsamples: random halves per standard error (0 disables it).
        seed: seed of the floor's label draws and of the halves (the report is deterministic).

    Cost per calibrator, bin and variant: the estimate plus R + se_subsamples / 4 estimates at its bandwidth
    (canonical O(n_b² K / block), top-label O(n_b²), classwise O(K n_b²); a few seconds for the first two at
    n_b = 2,000, K = 1,000 on one CPU thread).
    """
    check_logits(logits)
    check_labels(labels, logits.shape[1], logits.shape[0])
    check_levels(levels, logits.shape[0])
    check_positive_int(num_bins, "num_bins")
    check_level(level)
    check_report_options({"ece_bins": ece_bins, "bandwidth": bandwidth, "bandwidth_grid": bandwidth_grid,
                          "block_size": block_size, "kl_variants": kl_variants, "floor_resamples": floor_resamples,
                          "se_subsamples": se_subsamples})
    if not isinstance(calibrators, Mapping) or not calibrators:
        raise ValueError("`calibrators` must be a non-empty dict {name: TemperatureCalibrator or None}.")
    for name, calibrator in calibrators.items():
        if calibrator is not None and not isinstance(calibrator, TemperatureCalibrator):
            raise ValueError(
                f"`calibrators[{name!r}]` must be a TemperatureCalibrator or None (uncalibrated), got "
                f"{type(calibrator).__name__}."
            )
    if reference is None:
        reference = next((k for k, v in calibrators.items() if v is None), next(iter(calibrators)))
    elif reference not in calibrators:
        raise ValueError(f"`reference` must be one of {list(calibrators)}, got {reference!r}.")
    kl_args = {"bandwidth": bandwidth, "bandwidth_grid": bandwidth_grid, "block_size": block_size}
    if kl_variants is None:
        kl_variants = [v for v in VARIANTS if v != "classwise" or logits.shape[1] <= CLASSWISE_MAX_CLASSES]
    uncertainty = {"floor_resamples": floor_resamples, "se_subsamples": se_subsamples}

    levels = levels.to(logits.device)
    labels = labels.to(logits.device).long()
    bins = level_to_bin(levels, num_bins)
    edges = bin_edges(num_bins).tolist()
    rows: dict[str, list[LevelRow]] = {}
    for name, calibrator in calibrators.items():
        scaled = scale_logits(logits, levels, calibrator)
        temperature = (
            torch.ones_like(levels, dtype=torch.float64)
            if calibrator is None
            else calibrator.temperature(levels).to(logits.device)
        )
        generator = torch.Generator().manual_seed(seed)  # same draws for every calibrator
        rows[name] = [
            _evaluate_bin(scaled[bins == b], labels[bins == b], temperature[bins == b], edges[b], edges[b + 1],
                          ece_bins, kl_args, kl_variants, uncertainty, generator)
            for b in range(num_bins)
        ]
    return CalibrationReport(rows, num_bins, ece_bins, reference, level)
