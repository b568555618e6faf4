"""Explanation quality under ReCalX (the paper's Tables 1 and 2) on cluttered digits, and global importance.

Run (full, ~25 min on 2 shared CPU cores; ``--quick`` ~3 min)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/results_explanations.py [--quick] [--out docs/results]

Same structure as ``bench_surrogate_consistent.py``, at the paper's scale and with every calibrator:

1. For ``cluttered_cnn`` and ``cluttered_densenet`` (64×64 canvases, 8×8 patches → d = 64, zero baseline):
   ``recalx_lightning.calibration.calibrate`` (the pipeline of ``fit``) fits a global temperature (classic TS on
   clean val images), and binned and smooth ReCalX temperatures on perturbed val images (N images × M subsets
   per level bin, subsets from ``subset_generator(split_seed(seed, "calibration"), image index)``), all on one
   cache of logits.
2. Explain the first ``--images`` test images (target = true label) with Shapley value sampling and LIME
   (Captum's sampler, ridge surrogate) under: uncalibrated, global, binned plain/consistent, smooth
   plain/consistent (consistent_temperature="mean"); the same seed for all, so every comparison is paired
   (the same permutations / LIME samples).
3. Per image: localization in the target box, pointing game, Spearman alignment with the stroke mask
   (signed / absolute / positive), share of |φ| on background patches (patches equal to the baseline: removing
   them changes nothing), deletion and insertion AUC scored by the *uncalibrated* model for every variant;
   max-sensitivity (relative) on a subset, Shapley only.
4. Tables: mean per variant and the paired difference to uncalibrated with a 95% bootstrap CI.
5. Global importance (SAGE values) of ``synthetic_mlp`` on synthetic tabular data under uncalibrated vs
   binned (fitted by ``calibrate`` on perturbed val rows), recovery AUROC of the informative features, and the
   predictive power decomposition v(S) = bias + information − calibration error for a few feature sets.

Every model evaluation goes through :class:`LogitCache`, which memoises logits per input (exact replay: the
variants share coalitions, so the backbone runs once per distinct perturbed input, as the library's own
native engine does within one call). Outputs in ``--out``: ``explanations.md``, ``explanations.json``,
``explanations_heatmaps.png``, ``explanations_summary.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ci_dict, fmt_diff, metrics, nanmean, summarize, table_lines, to_jsonable  # noqa: E402

from recalx_lightning import Perturbation  # noqa: E402
from recalx_lightning.calibration import calibrate  # noqa: E402
from recalx_lightning.calibrators import apply_temperature  # noqa: E402
from recalx_lightning.data import ClutteredDigitsDataset, TabularDataset  # noqa: E402
from recalx_lightning.explain import (  # noqa: E402
    alignment,
    boxes_to_masks,
    decompose_predictive_power,
    deletion_curve,
    explain,
    global_importance,
    insertion_curve,
    localization,
    max_sensitivity,
    pointing_game,
    recovery_auroc,
    surrogate_temperature,
)
from recalx_lightning.models import load_reference_model  # noqa: E402
from recalx_lightning.plots import readable_heatmaps  # noqa: E402

VARIANTS = (  # name, calibrator key, mode
    ("uncalibrated", None, "plain"),
    ("global", "global", "plain"),
    ("binned plain", "binned", "plain"),
    ("binned consistent", "binned", "consistent"),
    ("smooth plain", "smooth", "plain"),
    ("smooth consistent", "smooth", "consistent"),
)
METHODS = ("shapley_sampling", "lime")
METRICS = metrics("loc", "pointing", "align_signed", "align_absolute", "align_positive", "bg_abs", "deletion_auc",
                  "insertion_auc")


# ------------------------------------------------------------------------------------------ logit cache
class LogitCache(nn.Module):
    """Memoise a frozen model's logits per input sample.

    Key = four seeded Gaussian projections of the sample (float64): identical inputs give identical keys,
    distinct inputs collide with probability ~0. Misses are evaluated in one batched call.
    """

    def __init__(self, model: nn.Module, sample_numel: int, seed: int = 0) -> None:
        super().__init__()
        self.model = model
        generator = torch.Generator().manual_seed(seed)
        self.projection = torch.randn(sample_numel, 4, generator=generator, dtype=torch.float64)
        self.index: dict[tuple[float, ...], int] = {}
        self.storage: Tensor | None = None
        self.size = 0
        self.hits = self.misses = 0

    def _append(self, logits: Tensor) -> None:
        need = self.size + logits.shape[0]
        if self.storage is None or self.storage.shape[0] < need:
            capacity = max(need, 2 * (0 if self.storage is None else self.storage.shape[0]), 4096)
            grown = torch.empty(capacity, logits.shape[1], dtype=logits.dtype)
            if self.storage is not None:
                grown[: self.size] = self.storage[: self.size]
            self.storage = grown
        self.storage[self.size : need] = logits
        self.size = need

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(x.shape[0], -1)
        keys = [tuple(row) for row in (flat.double() @ self.projection).tolist()]
        rows, missing = [], []
        pending: dict[tuple[float, ...], int] = {}
        for i, key in enumerate(keys):
            j = self.index.get(key)
            if j is None:
                j = pending.get(key)
                if j is None:
                    j = -1 - len(missing)
                    pending[key] = j
                    missing.append(i)
            rows.append(j)
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        if missing:
            with torch.no_grad():
                logits = self.model(x[torch.tensor(missing)]).detach().float()
            start = self.size
            self._append(logits)
            for k, i in enumerate(missing):
                self.index[keys[i]] = start + k
            rows = [start - 1 - j if j < 0 else j for j in rows]
        return self.storage[torch.tensor(rows)].clone()


# ------------------------------------------------------------------------------------------ image study
def image_study(name, args, log):
    t_model = time.perf_counter()
    model = load_reference_model(name, cache_dir=args.cache_dir).eval()
    val = ClutteredDigitsDataset("val", canvas_size=64)
    test = ClutteredDigitsDataset("test", canvas_size=64)
    perturbation = Perturbation.patches(64, patch_size=8, baseline="zeros")
    d = perturbation.num_features
    cached = LogitCache(model, 64 * 64, seed=args.seed)

    t0 = time.perf_counter()
    n_fit = min(args.fit_images, len(val))
    fitted = calibrate(model, val, perturbation, calibrators=("global", "binned", "smooth"), num_bins=10,
                       subsets_per_bin=args.per_bin, indices=range(n_fit), seed=args.seed, progress=False)
    calibrators, diagnostics, num_fit = fitted.calibrators, fitted.diagnostics, int(fitted.cache["levels"].numel())
    fit_seconds = time.perf_counter() - t0
    log(f"\n=== {name}: d = {d}; fitted on {num_fit} perturbed val samples ({n_fit} images) in {fit_seconds:.0f}s")
    log(f"  global T = {calibrators['global'].temperatures.item():.3g}")
    for key in ("binned", "smooth"):
        log(f"  {key} T (bins 0..9) = " + " ".join(f"{t:.3g}" for t in calibrators[key].temperatures.tolist()))

    n = min(args.images, len(test))
    x, labels, boxes = test.images[:n], test.labels[:n], test.boxes[:n]
    strokes = test.masks[:n].double()
    background = ~perturbation.informative(x)  # patches equal to the baseline
    with torch.no_grad():
        accuracy = float((cached(x).argmax(-1) == labels).double().mean())
    log(f"  {n} test images, clean accuracy {accuracy:.3f}, background patches "
        f"{background.double().sum(1).mean():.1f}/{d}")

    samples = {"shapley_sampling": args.permutations, "lime": args.lime_samples}
    results: dict = {"model": name, "d": d, "fit_samples": num_fit, "fit_seconds": fit_seconds,
                     "test_images": n, "clean_accuracy": accuracy,
                     "temperatures": {k: c.temperatures.tolist() for k, c in calibrators.items()},
                     "fit_diagnostics": diagnostics, "methods": {}}
    results["lime_shared_temperature"] = {
        k: surrogate_temperature(calibrators[k], d, "lime", "mean") for k in ("binned", "smooth")
    }
    heat: dict = {}
    for method in METHODS:
        per_variant: dict = {}
        for vname, ckey, mode in VARIANTS:
            t1 = time.perf_counter()
            cal = None if ckey is None else calibrators[ckey]
            maps, attributions, evals = [], [], 0
            for start in range(0, n, args.chunk):
                stop = start + args.chunk
                e = explain(cached, x[start:stop], perturbation, cal, labels[start:stop], method=method,
                            mode=mode, consistent_temperature="mean", num_samples=samples[method],
                            seed=args.seed)
                maps.append(e.maps)
                attributions.append(e.attributions)
                evals += e.num_evaluations
            maps, phi = torch.cat(maps), torch.cat(attributions)
            align = alignment(maps, strokes)
            deletion = deletion_curve(cached, x, phi, perturbation, labels, num_steps=args.curve_steps)
            insertion = insertion_curve(cached, x, phi, perturbation, labels, num_steps=args.curve_steps)
            abs_total = phi.abs().sum(1).clamp_min(1e-300)
            per_variant[vname] = {
                "loc": localization(maps, boxes),
                "pointing": pointing_game(maps, boxes),
                "align_signed": align["signed"],
                "align_absolute": align["absolute"],
                "align_positive": align["positive"],
                "bg_abs": (phi.abs() * background).sum(1) / abs_total,
                "bg_signed": (phi * background).sum(1) / background.sum(1).clamp_min(1) / phi.abs().mean(1),
                "deletion_auc": deletion.auc,
                "insertion_auc": insertion.auc,
                "_evals": evals,
                "_seconds": time.perf_counter() - t1,
                "_sum_phi": phi.sum(1),
            }
            heat.setdefault(method, {})[vname] = maps[: args.heatmap_images].clone()
            log(f"  {method:<16} {vname:<18} {per_variant[vname]['_seconds']:6.1f}s  evals={evals}  "
                f"cache hits {cached.hits} / misses {cached.misses}")
        reference = per_variant["uncalibrated"]
        log(f"\n  {method} (Δ = variant − uncalibrated)")
        for vname, values in per_variant.items():
            log("  " + summarize(vname, values, reference))
        table = {}
        for vname, values in per_variant.items():
            row = {"seconds": values["_seconds"], "evaluations": values["_evals"],
                   "mean_sum_phi": nanmean(values["_sum_phi"])}
            for key, _, _ in METRICS + (("bg_signed", "", ""),):
                row[key] = {"mean": nanmean(values[key]), "nan": int(torch.isnan(values[key]).sum())}
                if vname != "uncalibrated":
                    row[key]["vs_uncalibrated"] = ci_dict(values[key], reference[key], args.seed)
            for other, base in (("binned consistent", "binned plain"), ("smooth consistent", "smooth plain")):
                if vname == other:
                    row["vs_plain"] = {k: ci_dict(values[k], per_variant[base][k], args.seed) for k, _, _ in METRICS}
            table[vname] = row
        results["methods"][method] = table

    # robustness: relative max-sensitivity of Shapley sampling on a subset
    t2 = time.perf_counter()
    m = min(args.robust_images, n)
    xr, yr = x[:m], labels[:m]
    robust = {}
    for vname, ckey, mode in VARIANTS:
        cal = None if ckey is None else calibrators[ckey]

        def explain_fn(inputs, cal=cal, mode=mode):
            return explain(cached, inputs, perturbation, cal, yr, method="shapley_sampling", mode=mode,
                           num_samples=args.robust_permutations, seed=args.seed).attributions

        robust[vname] = {
            "relative": max_sensitivity(explain_fn, xr, radius=args.radius, num_samples=args.robust_draws,
                                        seed=args.seed, normalize=True),
            "absolute": max_sensitivity(explain_fn, xr, radius=args.radius, num_samples=args.robust_draws,
                                        seed=args.seed, normalize=False),
        }
    rob_table = {}
    for vname, values in robust.items():
        row = {}
        for key in ("relative", "absolute"):
            row[key] = {"mean": nanmean(values[key])}
            if vname != "uncalibrated":
                row[key]["vs_uncalibrated"] = ci_dict(values[key], robust["uncalibrated"][key], args.seed)
        rob_table[vname] = row
    results["robustness"] = {"images": m, "draws": args.robust_draws, "radius": args.radius,
                             "permutations": args.robust_permutations, "table": rob_table,
                             "seconds": time.perf_counter() - t2}
    log(f"  robustness ({m} images, {args.robust_draws} draws, r = {args.radius}): "
        + ", ".join(f"{v}={rob_table[v]['relative']['mean']:.3f}" for v in rob_table)
        + f"  ({time.perf_counter() - t2:.0f}s)")
    results["cache"] = {"hits": cached.hits, "misses": cached.misses}
    results["seconds"] = time.perf_counter() - t_model
    figure_data = {"images": x[: args.heatmap_images, 0].clone(), "boxes": boxes[: args.heatmap_images].clone(),
                   "labels": labels[: args.heatmap_images].clone(), "maps": heat}
    return results, figure_data


# ---------------------------------------------------------------------------------------- tabular study
def tabular_study(args, log):
    t0 = time.perf_counter()
    model = load_reference_model("synthetic_mlp", cache_dir=args.cache_dir).eval()
    val, test = TabularDataset("synthetic", "val"), TabularDataset("synthetic", "test")
    d = val.num_features
    perturbation = Perturbation.tabular(d, baseline="zeros")  # standardised: zero = train mean
    informative = torch.zeros(d, dtype=torch.bool)
    informative[val.informative_features] = True
    fitted = calibrate(model, val, perturbation, calibrators=("binned",), num_bins=10,
                       subsets_per_bin=args.tab_per_bin, seed=args.seed, progress=False)
    binned, num_fit = fitted.calibrator, int(fitted.cache["levels"].numel())
    log(f"\n=== synthetic_mlp: d = {d}, informative = {val.informative_features.tolist()}; binned T = "
        + " ".join(f"{t:.3g}" for t in binned.temperatures.tolist()) + f" ({num_fit} samples)")
    xt, yt = test.features, test.labels
    with torch.no_grad():
        accuracy = float((model(xt).argmax(-1) == yt).double().mean())
    out = {"d": d, "informative": val.informative_features.tolist(), "test_rows": len(yt), "test_accuracy": accuracy,
           "binned_temperatures": binned.temperatures.tolist(), "fit_samples": num_fit,
           "permutations": args.tab_permutations, "importance": {}, "decomposition": {}}
    for vname, cal in (("uncalibrated", None), ("binned", binned)):
        g = global_importance(model, xt, yt, perturbation, cal, num_permutations=args.tab_permutations,
                              seed=args.seed)
        auroc = recovery_auroc(g.values, informative)
        out["importance"][vname] = {"values": g.values.tolist(), "std_errors": g.std_errors.tolist(),
                                    "total": g.total, "recovery_auroc": auroc,
                                    "informative_sum": float(g.values[informative].sum()),
                                    "uninformative_sum": float(g.values[~informative].sum())}
        log(f"  SAGE {vname:<12} v(N) = {g.total:.4f}, AUROC = {auroc:.3f}, Σ informative = "
            f"{float(g.values[informative].sum()):.4f}, Σ others = {float(g.values[~informative].sum()):+.4f}")
    # decomposition of v(S) for a few feature sets
    generator = torch.Generator().manual_seed(args.seed)
    inf_idx = val.informative_features
    other = torch.nonzero(~informative).flatten()
    sets = {
        "all features": torch.ones(d, dtype=torch.bool),
        "informative only": informative.clone(),
        "uninformative only": ~informative,
        "2 informative": torch.zeros(d, dtype=torch.bool).index_fill_(0, inf_idx[:2], True),
        "random half": torch.zeros(d, dtype=torch.bool).index_fill_(0, torch.randperm(d, generator=generator)[: d // 2],
                                                                     True),
        "2 informative + 5 others": torch.zeros(d, dtype=torch.bool).index_fill_(0, torch.cat([inf_idx[:2], other[:5]]),
                                                                                 True),
    }
    with torch.no_grad():
        empty_raw = model(perturbation.apply(xt, torch.zeros(len(yt), d, dtype=torch.bool))).double()
        for sname, keep in sets.items():
            raw = model(perturbation.apply(xt, keep.expand(len(yt), -1))).double()
            level = perturbation.level(keep[None])
            row = {"size": int(keep.sum()), "level": float(level)}
            for vname, cal in (("uncalibrated", None), ("binned", binned)):
                if cal is None:
                    scaled, empty = raw, empty_raw
                    t = 1.0
                else:
                    t = float(cal.temperature(level))
                    scaled = apply_temperature(raw, cal.temperature(level))
                    empty = apply_temperature(empty_raw, cal.temperature(torch.ones(1, dtype=torch.float64)))
                p = decompose_predictive_power(scaled, empty, yt)
                row[vname] = {"T": t, **p._asdict()}
            out["decomposition"][sname] = row
            log(f"  v({sname}) |S|={row['size']}: " + "; ".join(
                f"{v}: {row[v]['value']:.4f} = {row[v]['baseline_bias']:.4f} + {row[v]['information']:.4f} − "
                f"{row[v]['calibration_error']:.4f} (T={row[v]['T']:.3g})" for v in ("uncalibrated", "binned")))
    out["seconds"] = time.perf_counter() - t0
    return out


# ------------------------------------------------------------------------------------------------ figures
def heatmap_figure(figures: dict, path: Path) -> None:
    """The first test images of each model and method × every variant, drawn by the library's heatmaps
    (:func:`recalx_lightning.plots.readable_heatmaps`: one colour scale per row, the target digit's box)."""
    names = [v[0] for v in VARIANTS]
    images, targets, regions, row_labels, maps = [], [], [], [], {name: [] for name in names}
    for model, fd in figures.items():
        masks = boxes_to_masks(fd["boxes"], tuple(fd["images"].shape[-2:]))
        for method in METHODS:
            label = f"{model.replace('cluttered_', '')}, {'Shapley' if method.startswith('shap') else 'LIME'}"
            for i in range(fd["images"].shape[0]):
                images.append(fd["images"][i][None])
                targets.append(int(fd["labels"][i]))
                regions.append(masks[i])
                row_labels.append(label)
                for name in names:
                    maps[name].append(fd["maps"][method][name][i])
    figure = readable_heatmaps(torch.stack(images), {name: torch.stack(v) for name, v in maps.items()},
                               torch.tensor(targets), regions=regions, row_labels=row_labels)
    figure.savefig(path, dpi=80)


def summary_figure(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("loc", "localization"), ("pointing", "pointing game"), ("align_positive", "Spearman φ⁺"),
            ("align_signed", "Spearman signed"), ("bg_abs", "bg share |φ|"), ("deletion_auc", "deletion AUC ↓"),
            ("insertion_auc", "insertion AUC ↑")]
    combos = [(m, meth) for m in results["models"] for meth in METHODS]
    variants = [v[0] for v in VARIANTS[1:]]
    colors = plt.cm.tab10(range(len(variants)))
    fig, axes = plt.subplots(len(keys), len(combos), figsize=(3.3 * len(combos), 1.75 * len(keys)), squeeze=False)
    for c, (model, method) in enumerate(combos):
        table = results["models"][model]["methods"][method]
        for r, (key, label) in enumerate(keys):
            ax = axes[r, c]
            for k, vname in enumerate(variants):
                ci = table[vname][key]["vs_uncalibrated"]
                ax.errorbar(ci["diff"], k, xerr=[[ci["diff"] - ci["low"]], [ci["high"] - ci["diff"]]], fmt="o",
                            color=colors[k], ms=3, capsize=2)
            ax.axvline(0, color="gray", lw=0.8)
            ax.set_yticks(range(len(variants)))
            ax.set_yticklabels(variants if c == 0 else [], fontsize=6)
            ax.tick_params(axis="x", labelsize=6)
            ax.invert_yaxis()
            if r == 0:
                short = "Shapley" if method.startswith("shap") else "LIME"
                ax.set_title(f"{model.replace('cluttered_', '')} · {short}", fontsize=8)
            if c == 0:
                ax.set_ylabel(label, fontsize=7)
    fig.suptitle("Paired difference to uncalibrated (mean, 95% bootstrap CI over test images)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- markdown
def markdown(results: dict, command: str) -> str:
    header = " | ".join(label.replace("|", "\\|") for _, label, _ in METRICS)
    lines = ["# Explanation quality under ReCalX (the paper's Tables 1 and 2)", "",
             f"Command ({results['wall_seconds'] / 60:.1f} min wall on 2 shared CPU cores, one thread):", "",
             f"```bash\n{command}\n```", ""]
    cfg = results["config"]
    lines += [
        "Setup: cluttered digits (64×64 canvases, one target digit among fragments of other digits), 8×8 patches "
        "(d = 64), zero baseline. Temperatures: *global* = classic TS on clean val images; *binned* / *smooth* = "
        f"ReCalX (B = 10) on {cfg['fit_images']} val images × {cfg['per_bin']} subsets per bin "
        "(`calibrate`: `subset_generator(split_seed(seed, \"calibration\"), i)`, as `fit`). Explained: the first "
        f"{cfg['images']} test images, target = true label; Shapley value sampling with {cfg['permutations']} "
        f"permutations, LIME with {cfg['lime_samples']} samples (Captum sampler, ridge surrogate); the same seed "
        "for every variant (paired). *consistent* = `mode=\"consistent\"`, `consistent_temperature=\"mean\"`. "
        "Deletion/insertion AUC are scored by the uncalibrated model for every variant "
        f"({cfg['curve_steps']} steps). Δ = variant − uncalibrated, mean over images with a 95% paired "
        "bootstrap CI (2000 resamples); `*` = CI excludes 0. *bg share* = share of |φ| on patches that equal the "
        "baseline (removing them changes nothing, ideal = 0).", ""]
    for model, res in results["models"].items():
        lines += [f"## {model}", "",
                  f"Clean test accuracy {res['clean_accuracy']:.3f}; {res['fit_samples']} calibration samples. "
                  f"Global T = {res['temperatures']['global'][0]:.3g}; binned T = "
                  + ", ".join(f"{t:.3g}" for t in res["temperatures"]["binned"])
                  + "; smooth T (centres) = " + ", ".join(f"{t:.3g}" for t in res["temperatures"]["smooth"])
                  + ". LIME consistent T* = "
                  + ", ".join(f"{k} {v:.3g}" for k, v in res["lime_shared_temperature"].items())
                  + ".", ""]
        for method in METHODS:
            table = res["methods"][method]
            title = "Shapley value sampling" if method == "shapley_sampling" else "LIME"
            lines += [f"### {model} · {title}", "", "Means:", ""]
            lines.append("| variant | " + header + " |")
            lines.append("|---|" + "---|" * len(METRICS))
            for vname, row in table.items():
                lines.append(f"| {vname} | " + " | ".join(f"{row[k]['mean']:.4f}" for k, _, _ in METRICS) + " |")
            lines += ["", "Paired differences to uncalibrated, 95% CI:", ""]
            lines.append("| variant | " + header + " |")
            lines.append("|---|" + "---|" * len(METRICS))
            for vname, row in table.items():
                if vname == "uncalibrated":
                    continue
                lines.append(f"| {vname} | " + " | ".join(fmt_diff(row[k]["vs_uncalibrated"]) for k, _, _ in METRICS)
                             + " |")
            lines += ["", "Consistent − plain (same calibrator), 95% CI:", ""]
            lines.append("| calibrator | " + header + " |")
            lines.append("|---|" + "---|" * len(METRICS))
            for vname in ("binned consistent", "smooth consistent"):
                lines.append(f"| {vname.split()[0]} | " + " | ".join(fmt_diff(table[vname]['vs_plain'][k])
                                                                     for k, _, _ in METRICS) + " |")
            lines.append("")
        rob = res["robustness"]
        lines += [f"### {model} · robustness (Shapley, {rob['permutations']} permutations, {rob['images']} images, "
                  f"{rob['draws']} noise draws U[−{rob['radius']}, {rob['radius']}])", "",
                  "Max-sensitivity, lower = more robust. Relative = max ‖φ(x+ε) − φ(x)‖ / ‖φ(x)‖.", "",
                  "| variant | relative | Δ relative | absolute | Δ absolute |", "|---|---|---|---|---|"]
        for vname, row in rob["table"].items():
            dr = fmt_diff(row["relative"]["vs_uncalibrated"]) if "vs_uncalibrated" in row["relative"] else "—"
            da = fmt_diff(row["absolute"]["vs_uncalibrated"], 4) if "vs_uncalibrated" in row["absolute"] else "—"
            lines.append(f"| {vname} | {row['relative']['mean']:.4f} | {dr} | {row['absolute']['mean']:.5f} | {da} |")
        lines.append("")
    tab = results["tabular"]
    lines += ["## Global importance on synthetic tabular data (synthetic_mlp)", "",
              f"20 standardised features, informative = {tab['informative']}, zero (= train mean) baseline; test "
              f"accuracy {tab['test_accuracy']:.3f}. Binned temperatures fitted on {tab['fit_samples']} perturbed val "
              "rows: " + ", ".join(f"{t:.3g}" for t in tab["binned_temperatures"]) + f". SAGE values by "
              f"{tab['permutations']} permutations on the {tab['test_rows']} test rows.", "",
              *table_lines(("calibrator", "v(N)", "recovery AUROC", "Σ φ informative", "Σ φ others"), "|" + "---|" * 5,
                           [(vname, f"{row['total']:.4f}", f"{row['recovery_auroc']:.3f}",
                             f"{row['informative_sum']:.4f}", f"{row['uninformative_sum']:+.4f}")
                            for vname, row in tab["importance"].items()])]

    def game(v: dict) -> list[str]:
        return [f"{v[key]:.4f}" for key in ("value", "baseline_bias", "information", "calibration_error")]

    lines += ["", "Decomposition v(S) = baseline bias + information − calibration error (nats; the empty coalition "
              "scored at T(λ = 1)):", "",
              *table_lines(("S", "size", "uncal. v", "bias", "info", "CE_KL", "binned T", "binned v", "bias", "info",
                            "CE_KL"), "|" + "---|" * 11,
                           [(sname, row["size"], *game(row["uncalibrated"]), f"{row['binned']['T']:.3g}",
                             *game(row["binned"])) for sname, row in tab["decomposition"].items()])]
    lines += ["", "Figures: `explanations_heatmaps.png` (first test images × variants), `explanations_summary.png` "
              "(paired differences with CIs).", "", "## Interpretation", "", "INTERPRETATION", ""]
    return "\n".join(lines)


def write_markdown(results: dict, out: Path) -> None:
    interpretation = out / "explanations_interpretation.md"
    body = interpretation.read_text().strip() if interpretation.is_file() else "(not written yet)"
    (out / "explanations.md").write_text(markdown(results, results["command"]).replace("INTERPRETATION", body) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test, ~3 min)")
    parser.add_argument("--out", default="docs/results")
    parser.add_argument("--models", nargs="+", default=["cluttered_cnn", "cluttered_densenet"])
    parser.add_argument("--images", type=int, default=150)
    parser.add_argument("--permutations", type=int, default=25)
    parser.add_argument("--lime-samples", type=int, default=300)
    parser.add_argument("--fit-images", type=int, default=200)
    parser.add_argument("--per-bin", type=int, default=10)
    parser.add_argument("--curve-steps", type=int, default=16)
    parser.add_argument("--robust-images", type=int, default=30)
    parser.add_argument("--robust-draws", type=int, default=3)
    parser.add_argument("--robust-permutations", type=int, default=10)
    parser.add_argument("--radius", type=float, default=0.02)
    parser.add_argument("--tab-per-bin", type=int, default=10)
    parser.add_argument("--tab-permutations", type=int, default=64)
    parser.add_argument("--heatmap-images", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=50, help="images per explain call")
    parser.add_argument("--cache-dir", default=None, help="reference model cache (default ~/.cache/recalx_lightning)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--render", action="store_true",
                        help="only rewrite explanations.md from explanations.json (+ explanations_interpretation.md)")
    args = parser.parse_args()
    out = Path(args.out)
    if args.render:
        results = json.loads((out / "explanations.json").read_text())
        write_markdown(results, out)
        return
    if args.quick:
        args.images, args.permutations, args.lime_samples = 16, 4, 100
        args.fit_images, args.per_bin, args.curve_steps = 40, 5, 8
        args.robust_images, args.robust_draws, args.robust_permutations = 4, 1, 3
        args.tab_permutations, args.tab_per_bin, args.heatmap_images = 8, 5, 2
    torch.set_num_threads(1)
    command = f"OMP_NUM_THREADS=1 .venv/bin/python benchmarks/{Path(__file__).name} " + " ".join(sys.argv[1:])
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    log_lines: list[str] = []

    def log(msg: str) -> None:
        print(msg, flush=True)
        log_lines.append(msg)

    log(f"command: {command}")
    results = {"config": {k: v for k, v in vars(args).items()}, "models": {}}
    figures = {}
    for name in args.models:
        results["models"][name], figures[name] = image_study(name, args, log)
        log(f"  {name} done in {results['models'][name]['seconds']:.0f}s")
    results["tabular"] = tabular_study(args, log)
    results["wall_seconds"] = time.perf_counter() - start
    results["command"] = command
    (out / "explanations.json").write_text(json.dumps(to_jsonable(results), indent=1))
    heatmap_figure(figures, out / "explanations_heatmaps.png")
    summary_figure(results, out / "explanations_summary.png")
    write_markdown(results, out)
    log(f"wrote {out}/explanations.{{md,json}}, explanations_heatmaps.png, explanations_summary.png "
        f"in {results['wall_seconds']:.0f}s")


if __name__ == "__main__":
    main()
