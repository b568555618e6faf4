"""Calibration under perturbation: the paper's Figure 1 and headline numbers.

For every setting (a reference model + a perturbation) this script

1. calls :func:`recalx_lightning.calibration.calibrate` — the pipeline ``python -m recalx_lightning fit`` runs —
   on N images of the *val* split (the rows ``fit`` draws for ``num_calibration_samples: N``, so ``fit`` with N
   and M gives the same temperatures) × M random subsets per level bin (B = 10 bins), subsets from
   ``subset_generator(split_seed(0, "calibration"), image index)``; the frozen model runs once per perturbed
   sample, and three calibrators are fitted on that cache: ``global`` (classic temperature scaling on the
   *clean* calibration images), ``binned`` (ReCalX_TS, one T per level bin) and ``smooth`` (log T piecewise
   linear in λ);
2. evaluates uncalibrated / global / binned / smooth on *fresh* samples from the *test* split (other images,
   other subsets: ``split_seed(0, "test")``) with :func:`recalx_lightning.calibration.evaluate`: per level bin
   KL-CE, ECE, NLL, accuracy, T; CE^max over levels and its relative reduction against the uncalibrated model;
3. reads each KL-CE variant's floor from the report: the same per-bin estimator on the predictions with labels
   *drawn from those predictions* (perfectly calibrated by construction), so any value there is estimator
   bias at this n, K and prediction distribution; the report also gives a standard error and marks values
   indistinguishable from calibrated. The headline is the top-label KL-CE (see the report's docstring).

Settings: digits CNN / timm DenseNet / timm ViT (32×32, 4×4 patches → d = 64, zero baseline = black),
breast-cancer and wine MLPs (one feature per column, zero baseline = the training mean of standardised data),
and the digits CNN with a Gaussian-blur baseline and with a (training) mean-colour baseline.

Run (one thread; ~10 minutes full, ~2 minutes quick on 2 shared CPU cores):

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/results_calibration.py [--quick] [--out docs/results]

Writes ``calibration.md`` (summary), ``calibration.json`` (all per-level rows, temperatures, fit diagnostics),
``calibration_error_vs_level.png`` (KL-CE against level, one panel per setting), ``calibration_ece_vs_level.png``,
``calibration_temperatures.png`` and ``calibration_reliability_<setting>.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from recalx_lightning import Perturbation, load_reference_model, make_baseline, make_dataset  # noqa: E402
from recalx_lightning._format import fmt  # noqa: E402
from recalx_lightning.calibration import calibrate, evaluate, split_samples  # noqa: E402
from recalx_lightning.perturbation import ChannelMeanBaseline  # noqa: E402

COMMAND = "OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/results_calibration.py"
NUM_BINS = 10
CALIBRATORS = ("uncalibrated", "global", "binned", "smooth")
COLORS = {"uncalibrated": "tab:red", "global": "tab:orange", "binned": "tab:blue", "smooth": "tab:green"}
PAPER = {"DenseNet-121 (ImageNet)": (0.96, 0.014), "ViT-B/16 (ImageNet)": (0.95, 0.013),
         "SigLIP-B/16 (ImageNet)": (0.85, 0.030)}
BLUR_SIGMA = 2.0
SEED = 0  # subsets: split_seed(SEED, "calibration") on val, split_seed(SEED, "test") on test (never one stream)
SEED_FLOOR = 3000  # labels drawn from the predictions for the KL-CE floors
KL_KEYS = ("kl_ce_top_label", "kl_ce", "kl_ce_classwise")


@dataclass
class Setting:
    name: str
    model: str
    kind: str  # "digits" | "tabular"
    baseline: str  # description for the table
    dataset: str = "digits"
    make_perturbation: object = None  # (train inputs) -> Perturbation
    extra: dict = field(default_factory=dict)


def digits_perturbation(baseline):
    return lambda train: Perturbation.patches(image_size=32, patch_size=4, baseline=baseline(train))


SETTINGS = [
    Setting("digits_cnn", "digits_cnn", "digits", "zeros (black)",
            make_perturbation=digits_perturbation(lambda train: "zeros")),
    Setting("digits_densenet", "digits_densenet", "digits", "zeros (black)",
            make_perturbation=digits_perturbation(lambda train: "zeros")),
    Setting("digits_vit", "digits_vit", "digits", "zeros (black)",
            make_perturbation=digits_perturbation(lambda train: "zeros")),
    Setting("breast_cancer_mlp", "breast_cancer_mlp", "tabular", "zeros (= train mean)", dataset="breast_cancer",
            make_perturbation=lambda train: Perturbation.tabular(train.shape[1], "zeros")),
    Setting("wine_mlp", "wine_mlp", "tabular", "zeros (= train mean)", dataset="wine",
            make_perturbation=lambda train: Perturbation.tabular(train.shape[1], "zeros")),
    Setting("digits_cnn_blur", "digits_cnn", "digits", f"Gaussian blur σ = {BLUR_SIGMA:g} px",
            make_perturbation=digits_perturbation(lambda train: make_baseline("blur", sigma=BLUR_SIGMA)),
            extra={"blur_sigma": BLUR_SIGMA}),
    Setting("digits_cnn_mean", "digits_cnn", "digits", "train mean colour",
            make_perturbation=digits_perturbation(lambda train: ChannelMeanBaseline.from_data(train))),
]


def budget(setting: Setting, quick: bool, n_val: int, n_test: int) -> dict:
    """Calibration rows N, subsets per bin M (calibration) and evaluation subsets per row and bin."""
    if setting.kind == "digits":
        n_cal = 100 if quick else 200
        m_cal = 5 if quick else 10
        target_eval = 1000 if quick else 5000
    else:  # few rows: all of them, many subsets each
        n_cal = n_val
        target_eval = 1000 if quick else 5000
        m_cal = math.ceil((500 if quick else 2000) / n_val)
    n_cal = min(n_cal, n_val)
    m_eval = math.ceil(target_eval / n_test)
    return {"n_cal": n_cal, "m_cal": m_cal, "n_eval": n_test, "m_eval": m_eval}


def load_split(setting: Setting, split: str):
    """The setting's dataset split: items (x, label)."""
    return make_dataset(setting.dataset, split)


def inputs_of(dataset) -> torch.Tensor:
    """All inputs of a split, stacked (for data-dependent baselines and the clean accuracy)."""
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


def run_setting(setting: Setting, quick: bool, out: Path, plan: dict | None = None) -> dict:
    """Calibrate and evaluate one setting; ``plan`` overrides the sizes of :func:`budget`."""
    t0 = time.perf_counter()
    model = load_reference_model(setting.model)
    model.eval()
    val, test = load_split(setting, "val"), load_split(setting, "test")
    perturbation = setting.make_perturbation(inputs_of(load_split(setting, "train")))
    plan = plan or budget(setting, quick, len(val), len(test))

    # calibration on the val split, on the rows `fit` draws for num_calibration_samples = N (split_samples):
    # cached perturbed logits, then every calibrator fitted on them
    rows, _ = split_samples(len(val), plan["n_cal"], 0, SEED)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fitted = calibrate(model, val, perturbation, calibrators=("global", "binned", "smooth"), num_bins=NUM_BINS,
                           subsets_per_bin=plan["m_cal"], indices=rows, seed=SEED, progress=False)
    caught = [str(w.message) for w in record]
    t_fit = time.perf_counter()

    # fresh evaluation data (test split, its own subset stream)
    report = evaluate(model, test, perturbation, fitted.calibrators, num_bins=NUM_BINS,
                      subsets_per_bin=plan["m_eval"], seed=SEED, split="test", progress=False, floor_seed=SEED_FLOOR)
    with torch.no_grad():
        test_x, test_y = inputs_of(test), torch.tensor([int(test[i][1]) for i in range(len(test))])
        clean_test_accuracy = float((model(test_x).argmax(1) == test_y).double().mean())
    binned_levels = report.rows["binned"]
    floor = [row.kl_ce_floor for row in binned_levels]
    t_report = time.perf_counter()
    figure = report.figure_reliability()
    figure.suptitle(f"{setting.name}: reliability per level bin (test split, fresh subsets)", y=1.0)
    figure.savefig(out / f"calibration_reliability_{setting.name}.png", dpi=80, bbox_inches="tight")

    result = {
        "setting": setting.name,
        "model": setting.model,
        "baseline": setting.baseline,
        "extra": setting.extra,
        "num_features": perturbation.num_features,
        "num_classes": int(fitted.cache["logits"].shape[-1]),
        "plan": plan,
        "calibration_samples": int(fitted.cache["levels"].numel()),
        "evaluation_samples": sum(row.samples for row in binned_levels),
        "clean_test_accuracy": clean_test_accuracy,
        "temperatures": fitted.temperatures,
        "fit_diagnostics": fitted.diagnostics,
        "fit_warnings": caught,
        "kl_ce_floor_binned": floor,
        **{f"{key}_floor_binned": [getattr(row, f"{key}_floor") for row in binned_levels] for key in KL_KEYS[::2]},
        "report": report.to_dict(),
        "seconds": {
            "calibration_and_fit": round(t_fit - t0, 2),
            "evaluation": round(t_report - t_fit, 2),
            "total": round(time.perf_counter() - t0, 2),
        },
    }
    s = report.summaries
    print(
        f"[{setting.name}] top-label KL-CE max uncal {s['uncalibrated'].kl_ce_top_label_max:.4f} binned "
        f"{s['binned'].kl_ce_top_label_max:.4f} ({100 * s['binned'].kl_ce_top_label_reduction:.0f}% lower)",
        flush=True,
    )
    print(
        f"[{setting.name}] acc {clean_test_accuracy:.3f}; KL-CE max uncal {s['uncalibrated'].kl_ce_max:.4f} "
        f"global {s['global'].kl_ce_max:.4f} binned {s['binned'].kl_ce_max:.4f} smooth {s['smooth'].kl_ce_max:.4f}"
        f" (floor {max(floor):.4f}); T binned {[round(t, 2) for t in result['temperatures']['binned']]}; "
        f"{result['seconds']['total']:.1f} s",
        flush=True,
    )
    return result


# --------------------------------------------------------------------------------------------- outputs
def _pct(x):
    """A relative reduction as the paper writes it: 0.96 → "-96%"."""
    return fmt(None if x is None else -100 * x, "+.0f", "%")



def summary(result: dict) -> dict:
    cals = result["report"]["calibrators"]
    return {name: cals[name]["summary"] for name in CALIBRATORS}


def argmax_level(result: dict, name: str, key: str = "kl_ce") -> str:
    levels = result["report"]["calibrators"][name]["levels"]
    values = [(r[key] if r[key] is not None else -1) for r in levels]
    r = levels[max(range(len(values)), key=values.__getitem__)]
    return f"{r['level_low']:.1f}–{r['level_high']:.1f}"



def _indistinguishable(r: dict, name: str, key: str) -> str:
    """'a/b': levels whose ``key`` the report marks indistinguishable from calibrated, of those measured."""
    flags = [row[f"{key}_indistinguishable"] for row in r["report"]["calibrators"][name]["levels"]]
    return f"{sum(bool(f) for f in flags)}/{sum(f is not None for f in flags)}"


def _max_row(r: dict, metric: str, extra: str = "") -> str:
    """One table row: the maximum over levels of ``metric`` per calibrator, reductions, worst level."""
    s = summary(r)
    return (
        f"| {r['setting']} | " + " | ".join(fmt(s[c][f"{metric}_max"]) for c in CALIBRATORS) + " | "
        + " | ".join(_pct(s[c][f"{metric}_reduction"]) for c in ("global", "binned", "smooth"))
        + f" | {extra}λ {argmax_level(r, 'uncalibrated', metric)} |"
    )


def _floor(r: dict, key: str) -> list[float]:
    return [x if x is not None else float("nan") for x in r.get(f"{key}_floor_binned", r["kl_ce_floor_binned"])]


def write_markdown(results: list[dict], out: Path, args, wall: float) -> None:
    lines = [
        "# Calibration under perturbation (ReCalX Figure 1 and headline numbers)",
        "",
        "Generated by `benchmarks/results_calibration.py`; every number below comes from that script. Command:",
        "",
        "```bash",
        COMMAND + (" --quick" if args.quick else "") + (f" --out {args.out}" if args.out != "docs/results" else ""),
        "```",
        "",
        f"Mode: **{'quick' if args.quick else 'full'}**; wall time {wall / 60:.1f} min on "
        f"{os.cpu_count()} shared CPU cores, one thread (torch {torch.__version__}, Python "
        f"{platform.python_version()}).",
        "",
        "Protocol: B = 10 equal-width level bins. Calibration (`recalx_lightning.calibration.calibrate`, the "
        "pipeline of `fit`): the N rows of the *val* split that `fit` draws for `num_calibration_samples: N` "
        "(`split_samples`, seed 0; `python -m recalx_lightning fit` with N and M gives these temperatures) × M "
        "random subsets per bin, row i's subsets from "
        "`subset_generator(split_seed(0, \"calibration\"), i)`, logits computed once; `global` = classic "
        "temperature scaling fitted on the *clean* calibration rows, `binned` (ReCalX_TS) and `smooth` fitted on "
        "the perturbed ones. Evaluation (`evaluate`): *fresh* subsets (`split_seed(0, \"test\")`) of the *test* "
        "split; KL-CE = leave-one-out kernel estimators "
        "(nats): top-label (Beta kernel, confidence vs correctness), canonical (Dirichlet), classwise, ECE"
        " = top-label, 15 confidence bins. Max = the maximum over the 10 level bins; Δ = relative "
        "change of that maximum against the uncalibrated model (−96% = 96% lower, the paper's convention).",
        "",
        "## Settings",
        "",
        "| setting | model | baseline | d | K | clean test acc. | calibration (rows × M × B) | evaluation "
        "(rows × M × B) |",
        "|---|---|---|---:|---:|---:|---|---|",
    ]
    for r in results:
        p = r["plan"]
        lines.append(
            f"| {r['setting']} | {r['model']} | {r['baseline']} | {r['num_features']} | {r['num_classes']} | "
            f"{r['clean_test_accuracy']:.3f} | {p['n_cal']} × {p['m_cal']} × 10 = {r['calibration_samples']:,} | "
            f"{p['n_eval']} × {p['m_eval']} × 10 = {r['evaluation_samples']:,} |"
        )
    for key, title in (("kl_ce_top_label", "Top-label KL calibration error (the headline): maximum over levels"),
                       ("kl_ce", "Canonical KL calibration error: maximum over levels"),
                       ("kl_ce_classwise", "Classwise KL calibration error: maximum over levels")):
        lines += [
            "",
            f"## {title}",
            "",
            "| setting | uncalibrated | global | binned | smooth | Δ global | Δ binned | Δ smooth | "
            "estimator floor | binned levels ≈ calibrated | worst level (uncal.) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        lines += [_max_row(r, key, f"{fmt(max(_floor(r, key)))} | {_indistinguishable(r, 'binned', key)} | ")
                  for r in results]
    lines += [
        "",
        "Estimator floor: the largest per-bin KL-CE of the *binned* predictions with labels drawn from those "
        "predictions (perfectly calibrated by construction; mean of 3 draws, from the report). It is the bias of "
        "the estimator at this n, K and prediction distribution. '≈ calibrated': level bins where the report "
        "finds the binned value within two standard errors of its floor. The top-label variant is the "
        "headline: at K = 10 and these confident predictions the canonical estimator's floor dominates its "
        "values (see the estimator-error study), the top-label one's does not. The paper's 0.013–0.030 at "
        "K = 1,000 can only be a top-label or classwise reading: our canonical floor at K = 1,000 is several "
        "nats.",
        "",
        "## Top-label ECE: maximum over levels",
        "",
        "| setting | uncalibrated | global | binned | smooth | Δ global | Δ binned | Δ smooth | worst level "
        "(uncal.) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    lines += [_max_row(r, "ece") for r in results]
    lines += [
        "",
        "## Fitted temperatures (binned, per level bin) and bound hits",
        "",
        "| setting | global T | binned T per bin (λ = 0 → 1) | bins at a bound (0.05 / 100) |",
        "|---|---:|---|---|",
    ]
    for r in results:
        t = r["temperatures"]
        hits = r["fit_diagnostics"]["binned"]["bound_hits"]
        lines.append(
            f"| {r['setting']} | {t['global'][0]:.3g} | " + ", ".join(f"{v:.3g}" for v in t["binned"])
            + f" | {hits if hits else 'none'} |"
        )
    lines += [
        "",
        "Paper (ImageNet, zero baseline, 5,000 samples per level): CE^max reduction " + "; ".join(
            f"{k} −{100 * v[0]:.0f}% (to {v[1]})" for k, v in PAPER.items()
        ) + ".",
        "",
        "## Figures",
        "",
        "- `calibration_error_vs_level.png` — canonical KL-CE against level, one panel per setting, the four "
        "calibrators; `calibration_top_label_error_vs_level.png` — the same for the top-label KL-CE.",
        "- `calibration_ece_vs_level.png` — the same for top-label ECE.",
        "- `calibration_temperatures.png` — fitted T(λ) (binned, smooth, global).",
        "- `calibration_reliability_<setting>.png` — reliability diagrams per level bin.",
        "",
        "## Interpretation",
        "",
        *interpretation(results),
        "",
    ]
    (out / "calibration.md").write_text("\n".join(lines))


def interpretation(results: list[dict]) -> list[str]:
    """Paragraphs written from the numbers of this run (conditional wording, so a rerun stays truthful)."""
    by = {r["setting"]: r for r in results}
    red = lambda r, c, k="kl_ce": summary(r)[c][f"{k}_reduction"]  # noqa: E731
    mx = lambda r, c, k="kl_ce": summary(r)[c][f"{k}_max"]  # noqa: E731
    floor = lambda r: max(r["kl_ce_floor_binned"])  # noqa: E731
    text = []
    digits = [by[n] for n in ("digits_cnn", "digits_densenet", "digits_vit") if n in by]
    if digits:
        top = "kl_ce_top_label"
        parts = [
            f"{r['setting']} {mx(r, 'uncalibrated', top):.3f} → {mx(r, 'binned', top):.4f} "
            f"({_pct(red(r, 'binned', top))}; floor {max(_floor(r, top)):.4f}, "
            f"{_indistinguishable(r, 'binned', top)} levels ≈ calibrated)"
            for r in digits
        ]
        reached = [r["setting"] for r in digits if red(r, "binned", top) >= 0.9]
        missed = [r["setting"] for r in digits if red(r, "binned", top) < 0.9]
        text.append(
            "**Headline: top-label KL-CE, digits, zero baseline.** CE^max (top-label) under binned "
            "temperatures: " + "; ".join(parts) + ". "
            + (f"The ≥ 90% reduction of the paper's range is reached for {', '.join(reached)}. " if reached
               else "")
            + (f"It is not reached for {', '.join(missed)}: read the binned maximum against its floor and "
               "standard error in the per-level table of the report. " if missed else "")
            + "The canonical numbers below are dominated by the estimator's bias at K = 10; the paper's "
            "0.013–0.030 at K = 1,000 compare with a top-label (or classwise) reading, not a canonical one."
        )
        parts = [
            f"{r['setting']} {mx(r, 'uncalibrated'):.2f} → {mx(r, 'binned'):.2f} nats ({_pct(red(r, 'binned'))}; "
            f"smooth {_pct(red(r, 'smooth'))}; estimator floor {floor(r):.2f})"
            for r in digits
        ]
        ece = ", ".join(
            f"{r['setting']} {mx(r, 'uncalibrated', 'ece'):.2f} → {mx(r, 'binned', 'ece'):.3f}" for r in digits
        )
        text.append(
            "**Digits, zero baseline (the paper's setting), canonical KL-CE.** Uncalibrated canonical KL-CE grows "
            "with the level as in the "
            "paper's Figure 1, and per-level temperatures remove most of it. CE^max: " + "; ".join(parts)
            + f". ECE^max: {ece}. The relative reductions are smaller than the paper's −96% / −95% / −85% "
            "mainly because the calibrated maxima sit at the estimator floor (see below): at K = 10 and "
            "these confident predictions the leave-one-out Dirichlet-kernel estimator reads "
            f"≈ {min(floor(r) for r in digits):.2f}–{max(floor(r) for r in digits):.2f} nats on predictions that "
            "are calibrated by construction, so no calibrator can score lower than that, and a 96% reduction "
            "would need an uncalibrated maximum 25× the floor. Calibrated values are comparable to the floor, "
            "i.e. consistent with zero true error; the paper's absolute values (0.013–0.030 at K = 1,000 on "
            "ImageNet) are not comparable with these canonical ones (other K, n, models and prediction distributions, "
            "and a canonical floor of several nats at K = 1,000)."
        )
    worse = [r["setting"] for r in results if red(r, "global") < 0]
    if worse:
        text.append(
            "**Classic temperature scaling is no fix.** The global temperature fitted on clean data makes the "
            f"worst-level KL-CE *worse* than no calibration for {', '.join(worse)} ("
            + ", ".join(f"{n} {_pct(red(by[n], 'global'))}" for n in worse)
            + "). Global temperatures: " + ", ".join(
                f"{n} T = {by[n]['temperatures']['global'][0]:.2g}" for n in worse) + ". Where the clean data call "
            "for T < 1 (an under-confident model on clean inputs), clean-data scaling sharpens exactly where "
            "perturbed inputs need softening (T ≫ 1); even a T > 1 fitted on clean data is far too small for "
            "high levels."
            + (f" On wine the clean validation rows are perfectly separable, so the global T runs to its lower "
               f"bound ({by['wine_mlp']['temperatures']['global'][0]:.2g}) and perturbed predictions become "
               "almost one-hot." if "wine_mlp" in by and by["wine_mlp"]["temperatures"]["global"][0] <= 0.051
               else "")
        )
    tab = [by[n] for n in ("breast_cancer_mlp", "wine_mlp") if n in by]
    if tab:
        text.append(
            "**Tabular (zero = training mean).** Here the baseline is the data mean, an in-distribution value, "
            "and the uncalibrated errors are small: "
            + "; ".join(
                f"{r['setting']} KL-CE^max {mx(r, 'uncalibrated'):.3f} → binned {mx(r, 'binned'):.3f} "
                f"({_pct(red(r, 'binned'))}, floor {floor(r):.3f}), ECE^max {mx(r, 'uncalibrated', 'ece'):.3f} → "
                f"{mx(r, 'binned', 'ece'):.3f}"
                for r in tab
            )
            + "".join(
                f" ({r['setting']}: the calibrators' ECE^max is *higher* than uncalibrated, "
                f"{mx(r, 'uncalibrated', 'ece'):.3f} → {mx(r, 'binned', 'ece'):.3f})"
                for r in tab if red(r, "binned", "ece") < 0)
            + ". With so few distinct rows (test: "
            + ", ".join(f"{r['plan']['n_eval']} for {r['setting']}" for r in tab)
            + ") many evaluation samples share a row, so the effective sample size is far below the nominal one, "
            "and differences of the order of the floor are noise. The paper names other modalities as open: on "
            "these small MLPs ReCalX is at best a modest gain, because the mean baseline barely miscalibrates them."
        )
    base = [by[n] for n in ("digits_cnn_blur", "digits_cnn_mean") if n in by]
    if base:
        blur = by.get("digits_cnn_blur")
        msg = "**Non-zero baselines (the paper's open question), digits CNN.** "
        if blur:
            tb, tg = blur["temperatures"]["binned"], blur["temperatures"]["global"][0]
            u = [row["kl_ce"] for row in blur["report"]["calibrators"]["uncalibrated"]["levels"]]
            g = [row["kl_ce"] for row in blur["report"]["calibrators"]["global"]["levels"]]
            low_help = sum(gi < ui for gi, ui in zip(g, u))
            zero = by.get("digits_cnn")
            below = None if zero is None else sum(
                ui < zr["kl_ce"] for ui, zr in zip(u, zero["report"]["calibrators"]["uncalibrated"]["levels"]))
            msg += (
                f"Blur (σ = {BLUR_SIGMA:g} px): CE^max {mx(blur, 'uncalibrated'):.2f} → binned "
                f"{mx(blur, 'binned'):.2f} ({_pct(red(blur, 'binned'))}), global {_pct(red(blur, 'global'))} "
                f"(floor {floor(blur):.2f}); the uncalibrated error peaks at λ {argmax_level(blur, 'uncalibrated')}"
                + (f" and is below the zero baseline's in {below} of {len(u)} level bins" if below is not None else "")
                + ". Binned temperatures span "
                f"{min(tb):.2f}–{max(tb):.2f} against a clean-data {tg:.2f}: "
                + ("the model is *under*-confident on blurred patches as on clean digits, " if max(tb) < 1 else "")
                + f"the level-dependence is weak, and the global temperature lowers the error in {low_help} of "
                f"{len(u)} level bins. A blurred patch keeps low-frequency evidence and looks like data, so the "
                "perturbation does not push the model off its data distribution the way black patches do; what is "
                "left at high λ is the estimator floor plus a fully blurred digit that the model reads poorly. "
            )
        if "digits_cnn_mean" in by:
            m = by["digits_cnn_mean"]
            msg += (
                f"Mean colour: CE^max {mx(m, 'uncalibrated'):.2f} → binned {mx(m, 'binned'):.2f} "
                f"({_pct(red(m, 'binned'))}), global {_pct(red(m, 'global'))}, worst uncalibrated level λ "
                f"{argmax_level(m, 'uncalibrated')}: a flat grey patch is unlike any digit image (black, at "
                "least, is the background), so overconfidence grows with the level and ReCalX is needed just as "
                "much as with zeros."
            )
        text.append(msg)
    hits = {r["setting"]: r["fit_diagnostics"]["binned"]["bound_hits"] for r in results}
    hits = {k: v for k, v in hits.items() if v}
    if hits:
        text.append(
            "**Temperatures at the bound T = 100.** Binned bins at the upper bound: "
            + "; ".join(f"{k} bins {v}" for k, v in hits.items())
            + ". In the last bin (λ ∈ [0.9, 1]) of the image models at most 6 of 64 patches survive and one "
            "sample in 7 is exactly the all-baseline image, whose logits are identical for every sample: little "
            "beyond the class prior is learnable, the cross-entropy optimum runs towards T → ∞ (uniform "
            "prediction) and the fitter stops at the bound (with a warning)."
            + (" Image settings that stay below the bound: " + ", ".join(
                f"{r['setting']} (T = {r['temperatures']['binned'][-1]:.3g} in the last bin)" for r in results
                if r["num_features"] == 64 and r["setting"] not in hits) + "."
               if any(r["num_features"] == 64 and r["setting"] not in hits for r in results) else "")
            + " Where earlier bins hit it too (the CNN with zeros), the model's perturbed predictions "
            "carry so little information that a near-uniform prediction is the best temperature-scaled one."
        )
    text.append(
        "**Estimator bias caveat.** The canonical KL-CE estimator (leave-one-out Dirichlet-kernel vote, bandwidth by "
        "leave-one-out likelihood) is biased upward at finite n: the vote of a few neighbours is noisy, and "
        "KL(vote ‖ f) is large wherever f is confident. The 'estimator floor' column measures this directly "
        "(labels drawn from the calibrated predictions, so the true error is 0); it is far larger than the rough "
        "(K − 1)/(2·n_eff) guess for the confident image models, and for zero / mean baselines smallest where "
        "predictions are near-uniform (λ ≈ 1). It shrinks far more slowly than 1/n (compare `--quick`, ~1,000 "
        "samples per bin, with the full mode, ~5,000). Read KL-CE differences against the floor and look at "
        "the top-label KL-CE and ECE (less biased here) alongside; the top-label floor is 1–2 orders of magnitude "
        "lower (tables above)."
    )
    return [paragraph for t in text for paragraph in (t, "")][:-1]


def _panel_grid(results, key, title, ylabel, out_path, log=False):
    from matplotlib.figure import Figure

    n = len(results)
    cols = 4
    rows = math.ceil(n / cols)
    figure = Figure(figsize=(4.0 * cols, 3.3 * rows))
    axes = figure.subplots(rows, cols, squeeze=False)
    for index, axis in enumerate(axes.flat):
        if index >= n:
            axis.axis("off")
            continue
        r = results[index]
        for name in CALIBRATORS:
            levels = r["report"]["calibrators"][name]["levels"]
            x = [(row["level_low"] + row["level_high"]) / 2 for row in levels]
            y = [row[key] if row[key] is not None else float("nan") for row in levels]
            axis.plot(x, y, marker="o", markersize=3, color=COLORS[name], label=name)
        if key in KL_KEYS:
            x = [(b + 0.5) / NUM_BINS for b in range(NUM_BINS)]
            axis.plot(x, _floor(r, key), color="grey", linestyle=":", label="estimator floor (binned)")
        axis.set_title(f"{r['setting']}  ({r['baseline']})", fontsize=9)
        axis.set_xlim(0, 1)
        axis.grid(alpha=0.3)
        if log:
            axis.set_yscale("log")
        axis.tick_params(labelsize=8)
        if index % cols == 0:
            axis.set_ylabel(ylabel, fontsize=9)
        axis.set_xlabel("perturbation level λ", fontsize=8)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if n < rows * cols:
        spare = axes.flat[n]
        spare.legend(handles, labels, loc="center", fontsize=11, frameon=False)
    else:
        figure.legend(handles, labels, loc="lower center", ncol=len(labels))
    figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    figure.savefig(out_path, dpi=90)


def _temperature_grid(results, out_path):
    from matplotlib.figure import Figure

    n, cols = len(results), 4
    rows = math.ceil(n / cols)
    figure = Figure(figsize=(4.0 * cols, 3.1 * rows))
    axes = figure.subplots(rows, cols, squeeze=False)
    grid = torch.linspace(0, 1, 201, dtype=torch.float64)
    from recalx_lightning.calibrators import make_calibrator

    for index, axis in enumerate(axes.flat):
        if index >= n:
            axis.axis("off")
            continue
        r = results[index]
        for name in ("global", "binned", "smooth"):
            cal = make_calibrator(name, **({} if name == "global" else {"num_bins": NUM_BINS}))
            cal.set_log_temperatures(torch.tensor(r["temperatures"][name], dtype=torch.float64).log(),
                                     warn_on_bounds=False)
            axis.plot(grid, cal.temperature(grid).detach(), color=COLORS[name], label=name)
        axis.axhline(100, color="grey", linestyle=":", linewidth=1)
        axis.set_yscale("log")
        axis.set_xlim(0, 1)
        axis.set_title(r["setting"], fontsize=9)
        axis.grid(alpha=0.3)
        axis.tick_params(labelsize=8)
        axis.set_xlabel("perturbation level λ", fontsize=8)
        if index % cols == 0:
            axis.set_ylabel("temperature T (log)", fontsize=9)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    axes.flat[n].legend(handles + [], labels, loc="center", fontsize=11, frameon=False)
    figure.suptitle("Fitted temperatures (dotted: upper bound T = 100)", fontsize=11)
    figure.tight_layout()
    figure.savefig(out_path, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples (≈ 2 minutes)")
    parser.add_argument("--out", default="docs/results")
    parser.add_argument("--only", nargs="*", help="run only these settings (debugging)")
    parser.add_argument("--replot", action="store_true",
                        help="re-render calibration.md and figures from an existing calibration.json (no compute)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.replot:
        payload = json.loads((out / "calibration.json").read_text())
        args.quick = payload["mode"] == "quick"
        render(payload["settings"], out, args, payload["wall_seconds"])
        return
    start = time.perf_counter()
    results = [run_setting(s, args.quick, out) for s in SETTINGS if not args.only or s.name in args.only]
    wall = time.perf_counter() - start
    payload = {
        "command": COMMAND + (" --quick" if args.quick else ""),
        "mode": "quick" if args.quick else "full",
        "wall_seconds": round(wall, 1),
        "num_bins": NUM_BINS,
        "seeds": {"subsets": SEED, "floor": SEED_FLOOR},
        "versions": {"torch": torch.__version__, "python": sys.version.split()[0]},
        "paper": {k: {"ce_max_reduction": v[0], "ce_max": v[1]} for k, v in PAPER.items()},
        "settings": results,
    }
    (out / "calibration.json").write_text(json.dumps(payload, indent=1))
    render(results, out, args, wall)
    print(f"wrote {out}/calibration.md, calibration.json and figures in {wall:.1f} s", flush=True)


def render(results: list[dict], out: Path, args, wall: float) -> None:
    _panel_grid(results, "kl_ce", "KL calibration error against perturbation level (test split, fresh subsets; "
                "log scale)", "KL-CE (nats, log)", out / "calibration_error_vs_level.png", log=True)
    _panel_grid(results, "kl_ce_top_label", "Top-label KL calibration error against perturbation level (test "
                "split, fresh subsets; log scale)", "top-label KL-CE (nats, log)",
                out / "calibration_top_label_error_vs_level.png", log=True)
    _panel_grid(results, "ece", "Top-label ECE against perturbation level (test split, fresh subsets)",
                "ECE", out / "calibration_ece_vs_level.png")
    _temperature_grid(results, out / "calibration_temperatures.png")
    write_markdown(results, out, args, wall)


if __name__ == "__main__":
    main()
