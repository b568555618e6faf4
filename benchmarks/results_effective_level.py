"""Paper level λ vs effective level λ_eff: calibration per level and explanation quality, paired.

Run (one thread; ``--quick`` ~2 min, full ~20–30 min on 2 shared CPU cores)::

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/results_effective_level.py [--quick] \
        [--out docs/results]

For each setting — plain digits (``digits_cnn``, 32×32, 4×4 patches), cluttered digits (``cluttered_cnn``,
``cluttered_densenet``, 64×64, 8×8 patches), tabular (``breast_cancer_mlp``, ``wine_mlp``); zero baseline —

1. two binned ReCalX calibrators are fitted on the same val images by the pipeline of ``fit``
   (``recalx_lightning.calibration``: ``PerturbedImages`` → ``collect`` → ``fit_calibrators``): *paper* on
   subsets drawn per bin of λ and labelled with λ, *effective* on subsets drawn per bin of λ_eff and labelled
   with λ_eff (``level="effective"``);
2. calibration on fresh test subsets, drawn once per level definition (``PerturbedImages`` → ``collect``; the
   other definition's levels of the same samples from ``levels_under``): ``evaluate_calibrators`` per bin of λ
   (uncalibrated, paper) and per bin of λ_eff (uncalibrated, effective), KL-CE and ECE, with the report's KL-CE
   estimator floor (labels drawn from the calibrated predictions); pooled NLL and ECE of all three on the same
   samples;
3. image settings: the first ``--images`` test images explained with ``explain`` (Shapley value sampling and LIME,
   the same seed for every variant, so comparisons are paired) under uncalibrated, paper plain, paper
   consistent, effective plain and effective consistent; per image localization (share of φ⁺ in the digit's
   box), pointing game, Spearman with the stroke mask, share of |φ| on background patches (features that are not
   informative), deletion/insertion AUC scored by the uncalibrated model, and the efficiency gap
   |Σφ − (v(N) − v(∅))| of the variant's own game; paired 95% bootstrap CIs;
4. tabular settings: the share of informative features and whether ``level="effective"`` explanations equal the
   paper's bit for bit (they must when every feature is informative).

Writes ``effective_level.md`` and ``effective_level.json`` into ``--out`` (``effective_level.md`` includes
``effective_level_interpretation.md`` from ``--out`` when present; ``--render`` rewrites it from the JSON).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ci_dict, fmt_diff, metrics, nanmean, table_lines, to_jsonable  # noqa: E402
from results_explanations import LogitCache  # noqa: E402

from recalx_lightning import BinnedTemperature, Perturbation, load_reference_model  # noqa: E402
from recalx_lightning.calibration import (  # noqa: E402
    PerturbedImages,
    collect,
    fit_calibrators,
    flat_samples,
    levels_under,
)
from recalx_lightning.calibrators import apply_temperature  # noqa: E402
from recalx_lightning.data import ClutteredDigitsDataset, DigitsDataset, TabularDataset  # noqa: E402
from recalx_lightning.explain import (  # noqa: E402
    alignment,
    deletion_curve,
    explain,
    insertion_curve,
    localization,
    pointing_game,
)
from recalx_lightning.metrics import negative_log_likelihood, top_label_calibration_error  # noqa: E402
from recalx_lightning.perturbation import level_to_bin  # noqa: E402
from recalx_lightning.report import evaluate_calibrators  # noqa: E402

NUM_BINS = 10
SEED_CALIBRATION, SEED_EVALUATION = 1000, 2000  # subsets of image i: subset_generator(seed, i)
LEVELS = ("paper", "effective")
VARIANTS = (  # name, calibrator (fitted on that level; None = uncalibrated), mode, level
    ("uncalibrated", None, "plain", "paper"),
    ("paper plain", "paper", "plain", "paper"),
    ("paper consistent", "paper", "consistent", "paper"),
    ("effective plain", "effective", "plain", "effective"),
    ("effective consistent", "effective", "consistent", "effective"),
    # control: no temperature, but the effective level's interpretable representation (LIME/KernelSHAP explain
    # only the informative features); for Shapley it equals uncalibrated
    ("uncalibrated informative-only", None, "plain", "effective"),
)
METHODS = ("shapley_sampling", "lime")
METRICS = metrics("loc", "pointing", "align_signed", "align_positive", "bg_abs", "deletion_auc", "insertion_auc",
                  "efficiency_gap")
IMAGE_SETTINGS = {  # name: (dataset factory, image size, patch size)
    "digits_cnn": (lambda split: DigitsDataset(split), 32, 4),
    "cluttered_cnn": (lambda split: ClutteredDigitsDataset(split, canvas_size=64), 64, 8),
    "cluttered_densenet": (lambda split: ClutteredDigitsDataset(split, canvas_size=64), 64, 8),
}
TABULAR_SETTINGS = {"breast_cancer_mlp": "breast_cancer", "wine_mlp": "wine"}


# ------------------------------------------------------------------------------------------- calibration
def fit_per_level(model, perturbation, data, indices, per_bin) -> tuple[dict, dict]:
    """Binned calibrators fitted on each level's own calibration samples of ``data[indices]``."""
    calibrators, info = {}, {}
    for level in LEVELS:
        images = PerturbedImages(data, indices, perturbation, NUM_BINS, per_bin, SEED_CALIBRATION, level)
        cache = collect(model, images, progress=False)
        calibrators[level] = BinnedTemperature(NUM_BINS)
        diagnostics = fit_calibrators(cache, {"binned": calibrators[level]})["binned"]
        levels = cache["levels"].reshape(-1)
        info[level] = {"samples": int(levels.numel()), "temperatures": calibrators[level].temperatures.tolist(),
                       "converged": diagnostics["converged"],
                       "bin_counts": torch.bincount(level_to_bin(levels, NUM_BINS), minlength=NUM_BINS).tolist()}
    return calibrators, info


def evaluation_set(model, perturbation, data, indices, per_bin, level):
    """Fresh subsets of ``data[indices]`` drawn per bin of ``level``: logits (float64), labels and *both* levels
    of every sample. One image per forward (its B·M perturbations), as the explanations' logit cache sees them."""
    images = PerturbedImages(data, indices, perturbation, NUM_BINS, per_bin, SEED_EVALUATION, level)
    cache = collect(model, images, batch_size=1, progress=False)
    logits, labels, _ = flat_samples(cache)
    return logits.double(), labels, {lv: levels_under(images, cache, lv).reshape(-1) for lv in LEVELS}


def calibration_study(model, perturbation, calibrators, data, indices, per_bin) -> dict:
    out = {}
    for sampled in LEVELS:
        logits, labels, levels = evaluation_set(model, perturbation, data, indices, per_bin, sampled)
        entry = {"samples": int(labels.numel()), "reports": {}, "floor": {}, "pooled": {}}
        for level in LEVELS:
            report = evaluate_calibrators(logits, labels, levels[level],
                                          {"uncalibrated": None, level: calibrators[level]}, num_bins=NUM_BINS,
                                          level=level)
            entry["reports"][level] = report.to_dict()
            entry["floor"][level] = [row.kl_ce_floor for row in report.rows[level]]
        scaled = {"uncalibrated": logits, "paper": calibrators["paper"](logits, levels["paper"]),
                  "effective": calibrators["effective"](logits, levels["effective"])}
        for name, s in scaled.items():
            entry["pooled"][name] = {"nll": float(negative_log_likelihood(s, labels)),
                                     "ece": float(top_label_calibration_error(s, labels))}
        out[sampled] = entry
    return out


# ------------------------------------------------------------------------------------------ explanations
def efficiency_gap(model, x, perturbation, phi, targets, calibrator) -> Tensor:
    """|Σφ − (v(N) − v(∅))| per input; v at T(0) for N and T(1) for ∅ (both level definitions agree there)."""
    with torch.no_grad():
        full = model(x).double()
        empty = model(perturbation.apply(x, torch.zeros(x.shape[0], perturbation.num_features))).double()
    if calibrator is not None:
        with torch.no_grad():
            full = apply_temperature(full, calibrator.temperature(torch.zeros(1, dtype=torch.float64)))
            empty = apply_temperature(empty, calibrator.temperature(torch.ones(1, dtype=torch.float64)))
    t = targets[:, None]
    gap = full.softmax(-1).gather(1, t) - empty.softmax(-1).gather(1, t)
    return (phi.sum(1) - gap.squeeze(1)).abs()


def explanation_study(cached, perturbation, calibrators, x, labels, boxes, strokes, args, log) -> dict:
    samples = {"shapley_sampling": args.permutations, "lime": args.lime_samples}
    background = ~perturbation.informative(x)
    out = {"background_patches_mean": float(background.double().sum(1).mean()), "methods": {}}
    for method in args.methods:
        per_variant = {}
        for vname, key, mode, level in VARIANTS:
            if vname not in args.variants:
                continue
            t0 = time.perf_counter()
            cal = None if key is None else calibrators[key]
            phis, maps = [], []
            for start in range(0, x.shape[0], args.chunk):
                sl = slice(start, start + args.chunk)
                e = explain(cached, x[sl], perturbation, cal, labels[sl], method=method, mode=mode,
                            num_samples=samples[method], seed=args.seed, level=level)
                phis.append(e.attributions)
                maps.append(e.maps)
            phi, maps = torch.cat(phis), torch.cat(maps)
            align = alignment(maps, strokes)
            per_variant[vname] = {
                "loc": localization(maps, boxes),
                "pointing": pointing_game(maps, boxes),
                "align_signed": align["signed"],
                "align_positive": align["positive"],
                "bg_abs": (phi.abs() * background).sum(1) / phi.abs().sum(1).clamp_min(1e-300),
                "deletion_auc": deletion_curve(cached, x, phi, perturbation, labels, num_steps=args.curve_steps).auc,
                "insertion_auc": insertion_curve(cached, x, phi, perturbation, labels,
                                                 num_steps=args.curve_steps).auc,
                "efficiency_gap": efficiency_gap(cached, x, perturbation, phi, labels, cal),
                "_seconds": time.perf_counter() - t0,
            }
            done = per_variant[vname]
            log(f"  {method:<16} {vname:<21} {done['_seconds']:6.1f}s  bg {nanmean(done['bg_abs']):.4f}"
                f"  eff-gap max {float(per_variant[vname]['efficiency_gap'].max()):.2e}  cache misses {cached.misses}")
        table = {}
        reference = per_variant["uncalibrated"]
        for vname, values in per_variant.items():
            row = {"seconds": values["_seconds"]}
            for key, _, _ in METRICS:
                row[key] = {"mean": nanmean(values[key]), "max": float(torch.nan_to_num(values[key]).max())}
                if vname != "uncalibrated":
                    row[key]["vs_uncalibrated"] = ci_dict(values[key], reference[key], args.seed)
            if vname.startswith("effective") or vname == "uncalibrated informative-only":
                others = ("paper plain", "paper consistent", "uncalibrated informative-only")
                for other in [v for v in others if v in per_variant and v != vname]:
                    row[f"vs {other}"] = {k: ci_dict(values[k], per_variant[other][k], args.seed)
                                          for k, _, _ in METRICS}
            table[vname] = row
        out["methods"][method] = table
    return out


# ------------------------------------------------------------------------------------------------ settings
def image_setting(name, args, log) -> dict:
    t0 = time.perf_counter()
    make, size, patch = IMAGE_SETTINGS[name]
    model = load_reference_model(name, cache_dir=args.cache_dir).eval()
    val, test = make("val"), make("test")
    perturbation = Perturbation.patches(size, patch_size=patch, baseline="zeros")
    cached = LogitCache(model, size * size, seed=args.seed)
    n_fit = min(args.fit_images, len(val))
    calibrators, fit_info = fit_per_level(cached, perturbation, val, range(n_fit), args.per_bin)
    log(f"\n=== {name}: d = {perturbation.num_features}, fitted on {n_fit} val images")
    for level in LEVELS:
        log(f"  {level:<9} T = " + " ".join(f"{t:.3g}" for t in fit_info[level]["temperatures"])
            + f"  (samples per bin {fit_info[level]['bin_counts']})")
    n_eval = min(args.eval_images, len(test))
    calibration = calibration_study(cached, perturbation, calibrators, test, range(n_eval), args.eval_per_bin)
    for sampled, entry in calibration.items():
        maxima = {lv: entry["reports"][lv]["calibrators"][lv]["summary"] for lv in LEVELS}
        unc = {lv: entry["reports"][lv]["calibrators"]["uncalibrated"]["summary"] for lv in LEVELS}
        log(f"  eval sampled by {sampled}: KL-CE max uncal(λ) {unc['paper']['kl_ce_max']:.4f} paper "
            f"{maxima['paper']['kl_ce_max']:.4f} | uncal(λ_eff) {unc['effective']['kl_ce_max']:.4f} effective "
            f"{maxima['effective']['kl_ce_max']:.4f}; pooled NLL " + ", ".join(
                f"{k} {v['nll']:.4f}" for k, v in entry["pooled"].items()))
    n = min(args.images, len(test))
    x, labels = test.images[:n], test.labels[:n]
    explanations = explanation_study(cached, perturbation, calibrators, x, labels, test.boxes[:n],
                                     test.masks[:n].double(), args, log)
    with torch.no_grad():
        accuracy = float((cached(x).argmax(-1) == labels).double().mean())
    return {"model": name, "d": perturbation.num_features, "fit_images": n_fit, "fit": fit_info,
            "eval_images": n_eval, "calibration": calibration, "images": n, "clean_accuracy": accuracy,
            "explanations": explanations, "seconds": time.perf_counter() - t0}


def tabular_setting(name, args, log) -> dict:
    t0 = time.perf_counter()
    model = load_reference_model(name, cache_dir=args.cache_dir).eval()
    val, test = TabularDataset(TABULAR_SETTINGS[name], "val"), TabularDataset(TABULAR_SETTINGS[name], "test")
    perturbation = Perturbation.tabular(val.num_features, baseline="zeros")
    calibrators, fit_info = fit_per_level(model, perturbation, val, range(len(val)), args.tab_per_bin)
    calibration = calibration_study(model, perturbation, calibrators, test, range(len(test)), args.tab_eval_per_bin)
    informative = perturbation.informative(test.features)
    identical = {}
    for method in ("shapley_sampling", "kernel_shap"):
        kwargs = dict(method=method, num_samples=20 if method == "shapley_sampling" else 200, seed=args.seed)
        paper = explain(model, test.features, perturbation, calibrators["effective"], test.labels, **kwargs)
        effective = explain(model, test.features, perturbation, calibrators["effective"], test.labels,
                            level="effective", **kwargs)
        identical[method] = bool(torch.equal(paper.attributions, effective.attributions))
    same_temperatures = calibrators["paper"].temperatures.tolist() == calibrators["effective"].temperatures.tolist()
    log(f"\n=== {name}: d = {perturbation.num_features}, informative share {float(informative.double().mean()):.4f};"
        f" same temperatures {same_temperatures}; effective == paper explanations {identical}")
    return {"model": name, "d": perturbation.num_features, "fit": fit_info, "calibration": calibration,
            "informative_share": float(informative.double().mean()), "same_temperatures": same_temperatures,
            "explanations_identical": identical, "seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------------------ markdown
def _calibration_lines(name: str, res: dict) -> list[str]:
    lines = [f"Calibration on fresh test subsets ({res['calibration']['paper']['samples']} samples per sampling "
             "scheme). KL-CE/ECE max = worst level bin (bins of the calibrator's own level, uncalibrated in both); "
             "floor = largest per-bin KL-CE of the calibrated predictions with labels drawn from themselves (the "
             "report's, mean of 3 draws).", "",
             "| subsets drawn per bin of | calibrator | binned by | KL-CE max | floor | ECE max | pooled NLL "
             "| pooled ECE |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for sampled, entry in res["calibration"].items():
        for cal in ("uncalibrated", "paper", "effective"):
            for level in LEVELS if cal == "uncalibrated" else (cal,):
                summary = entry["reports"][level]["calibrators"][cal]["summary"]
                floor = "—" if cal == "uncalibrated" else f"{max(entry['floor'][level]):.4f}"
                pooled = entry["pooled"][cal]
                by = "λ" if level == "paper" else "λ_eff"
                drawn = "λ" if sampled == "paper" else "λ_eff"
                lines.append(f"| {drawn} | {cal} | {by} | {summary['kl_ce_max']:.4f} | "
                             f"{floor} | {summary['ece_max']:.4f} | {pooled['nll']:.4f} | {pooled['ece']:.4f} |")
    lines += ["", "KL-CE per level bin (subsets drawn per bin of the same level):", "",
              "| calibrator | " + " | ".join(f"b{b}" for b in range(NUM_BINS)) + " |",
              "|---|" + "---:|" * NUM_BINS]
    for level in LEVELS:
        report = res["calibration"][level]["reports"][level]["calibrators"]
        for cal in ("uncalibrated", level):
            values = [r["kl_ce"] for r in report[cal]["levels"]]
            label = f"{cal} (by {'λ' if level == 'paper' else 'λ_eff'})"
            lines.append(f"| {label} | " + " | ".join("—" if v is None else f"{v:.3f}" for v in values) + " |")
        lines.append(f"| floor ({level}) | " + " | ".join(f"{v:.3f}" for v in res["calibration"][level]["floor"][level])
                     + " |")
    return lines


def markdown(results: dict) -> str:
    header = " | ".join(label.replace("|", "\\|") for _, label, _ in METRICS)
    cfg = results["config"]
    lines = ["# Paper level λ vs effective level λ_eff", "",
             f"Command ({results['wall_seconds'] / 60:.1f} min wall on 2 shared CPU cores, one thread):", "",
             f"```bash\n{results['command']}\n```", "",
             f"Calibration: {cfg['fit_images']} val images × {cfg['per_bin']} subsets per bin (B = {NUM_BINS}) per "
             "level "
             f"definition; evaluation on {cfg['eval_images']} test images × {cfg['eval_per_bin']} fresh subsets per "
             f"bin. Explanations: the first {cfg['images']} test images, target = true label, Shapley value sampling "
             f"({cfg['permutations']} permutations) and LIME ({cfg['lime_samples']} samples, ridge surrogate), the "
             "same seed for every variant. Δ = paired difference, mean over images with a 95% bootstrap CI (2000 "
             "resamples), `*` = CI excludes 0. Deletion/insertion AUC scored by the uncalibrated model "
             f"({cfg['curve_steps']} steps). Efficiency gap = |Σφ − (v(N) − v(∅))| of the variant's own game.", ""]
    for name, res in results["image"].items():
        lines += [f"## {name}", "",
                  f"d = {res['d']}, clean test accuracy {res['clean_accuracy']:.3f}, background (uninformative) "
                  f"patches per image {res['explanations']['background_patches_mean']:.1f}. Temperatures: paper "
                  + ", ".join(f"{t:.3g}" for t in res["fit"]["paper"]["temperatures"]) + "; effective "
                  + ", ".join(f"{t:.3g}" for t in res["fit"]["effective"]["temperatures"])
                  + f" (calibration samples per λ_eff bin: {res['fit']['effective']['bin_counts']}).", ""]
        lines += _calibration_lines(name, res) + [""]
        for method, table in res["explanations"]["methods"].items():
            title = "Shapley value sampling" if method == "shapley_sampling" else "LIME"
            lines += [f"### {name} · {title}", "", "| variant | " + header + " |", "|---|" + "---:|" * len(METRICS)]
            for vname, row in table.items():
                cells = [f"{row[k]['mean']:.2e}" if k == "efficiency_gap" else f"{row[k]['mean']:.4f}"
                         for k, _, _ in METRICS]
                lines.append(f"| {vname} | " + " | ".join(cells) + " |")
            lines += ["", "| Δ | " + " | ".join(label.replace("|", "\\|") for _, label, _ in METRICS[:-1]) + " |",
                      "|---|" + "---|" * (len(METRICS) - 1)]
            for vname, row in table.items():
                if vname == "uncalibrated":
                    continue
                comparisons = [("uncalibrated", row[k]["vs_uncalibrated"]) for k, _, _ in METRICS[:-1]]
                lines.append(f"| {vname} − uncalibrated | " + " | ".join(fmt_diff(c) for _, c in comparisons) + " |")
            for vname in [v for v in ("effective plain", "effective consistent") if v in table]:
                others = ("paper plain", "paper consistent", "uncalibrated informative-only")
                for other in [v for v in others if v in table]:
                    lines.append(f"| {vname} − {other} | " + " | ".join(
                        fmt_diff(table[vname][f"vs {other}"][k]) for k, _, _ in METRICS[:-1]) + " |")
            lines += ["", "Max efficiency gap over images: " + ", ".join(
                f"{v} {row['efficiency_gap']['max']:.1e}" for v, row in table.items()) + ".", ""]
    header = ("model", "d", "informative share", "same T (paper, effective)",
              "effective == paper (Shapley, KernelSHAP)", "KL-CE max paper", "KL-CE max effective")
    rows = []
    for name, res in results["tabular"].items():
        rep, same = res["calibration"], res["explanations_identical"]
        maxima = [rep[lv]["reports"][lv]["calibrators"][lv]["summary"]["kl_ce_max"] for lv in LEVELS]
        rows.append((name, res["d"], f"{res['informative_share']:.4f}", res["same_temperatures"],
                     f"{same['shapley_sampling']}, {same['kernel_shap']}", *(f"{m:.4f}" for m in maxima)))
    lines += ["## Tabular data", "", *table_lines(header, "|---|---:|---:|---|---|---:|---:|", rows)]
    interpretation = Path(results["config"]["out"]) / "effective_level_interpretation.md"
    body = interpretation.read_text().strip() if interpretation.is_file() else "(not written yet)"
    lines += ["", "## Interpretation", "", body]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    parser.add_argument("--out", default="docs/results")
    parser.add_argument("--models", nargs="+", default=list(IMAGE_SETTINGS))
    parser.add_argument("--tabular", nargs="*", default=list(TABULAR_SETTINGS))
    parser.add_argument("--images", type=int, default=150)
    parser.add_argument("--permutations", type=int, default=20)
    parser.add_argument("--lime-samples", type=int, default=300)
    parser.add_argument("--fit-images", type=int, default=200)
    parser.add_argument("--per-bin", type=int, default=10)
    parser.add_argument("--eval-images", type=int, default=200)
    parser.add_argument("--eval-per-bin", type=int, default=10)
    parser.add_argument("--tab-per-bin", type=int, default=20)
    parser.add_argument("--tab-eval-per-bin", type=int, default=20)
    parser.add_argument("--curve-steps", type=int, default=16)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--variants", nargs="+", default=[v[0] for v in VARIANTS], choices=[v[0] for v in VARIANTS])
    parser.add_argument("--chunk", type=int, default=50)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--render", action="store_true", help="only rewrite the markdown from the JSON")
    args = parser.parse_args()
    out = Path(args.out)
    if args.render:
        results = json.loads((out / "effective_level.json").read_text())
        (out / "effective_level.md").write_text(markdown(results))
        return
    if args.quick:
        args.images, args.permutations, args.lime_samples, args.fit_images = 12, 4, 60, 30
        args.per_bin, args.eval_images, args.eval_per_bin, args.curve_steps = 3, 30, 4, 8
        args.tab_per_bin, args.tab_eval_per_bin = 4, 4
    torch.set_num_threads(1)
    command = f"OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/{Path(__file__).name} " + shlex.join(
        sys.argv[1:])
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    def log(message: str) -> None:
        print(message, flush=True)

    log(f"command: {command}")
    results = {"config": vars(args), "command": command, "image": {}, "tabular": {}}
    for name in args.tabular:
        results["tabular"][name] = tabular_setting(name, args, log)
    for name in args.models:
        results["image"][name] = image_setting(name, args, log)
        log(f"  {name} done in {results['image'][name]['seconds']:.0f}s")
        results["wall_seconds"] = time.perf_counter() - start
        (out / "effective_level.json").write_text(json.dumps(to_jsonable(results), indent=1))  # partial results
        (out / "effective_level.md").write_text(markdown(results))
    results["wall_seconds"] = time.perf_counter() - start
    (out / "effective_level.json").write_text(json.dumps(to_jsonable(results), indent=1))
    (out / "effective_level.md").write_text(markdown(results))
    log(f"wrote {out}/effective_level.{{md,json}} in {results['wall_seconds']:.0f}s")


if __name__ == "__main__":
    main()
