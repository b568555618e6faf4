"""Uncalibrated vs ReCalX plain vs ReCalX consistent LIME / KernelSHAP on cluttered digits.

Run:  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_surrogate_consistent.py [--images 30] [--samples 500]

Steps: the reference CNN (``cluttered_cnn``, trained and cached on first use, ~100 s; ``--model digits_cnn`` for
the 32×32 digits) ; a BinnedTemperature (B = 10) fitted with ``fit_temperatures`` on perturbed validation
images (``--fit-images`` images × ``--per-bin`` random subsets per level bin, zero baseline, patches of
``--patch`` px); then ``--images`` test images explained with LIME (ridge surrogate) and KernelSHAP, each
uncalibrated, with ReCalX temperatures at each coalition's own level (plain) and with ReCalX consistent (one
shared T*, rules mean/smaller/larger). Same seed, hence the same coalitions, for every variant.

Prints per method and variant (means over images, 95% paired bootstrap CI of the difference to plain):
  loc       localization: share of positive attribution inside the target digit's box
  bg|φ|     share of absolute attribution on background patches (patches equal to the baseline everywhere:
            replacing them changes nothing, so an ideal explanation gives them 0)
  bgφ/|φ|   mean signed attribution of background patches divided by the mean |φ| of all patches
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from recalx_lightning import BinnedTemperature, Perturbation, fit_temperatures
from recalx_lightning.data import make_dataset
from recalx_lightning.explain import explain, localization, paired_bootstrap_ci, surrogate_temperature
from recalx_lightning.models import load_reference_model


def fit_calibrator(model, perturbation, images, labels, per_bin: int, num_bins: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    logits, levels, targets = [], [], []
    with torch.no_grad():
        for b in range(num_bins):
            for x, y in zip(images, labels, strict=True):
                keep = perturbation.sample_keep(per_bin, b, num_bins, generator)
                batch = perturbation.apply(x.unsqueeze(0).expand(per_bin, *x.shape), keep)
                logits.append(model(batch))
                levels.append(perturbation.level(keep))
                targets.append(torch.full((per_bin,), int(y)))
    calibrator, diagnostics = fit_temperatures(
        torch.cat(logits), torch.cat(targets), torch.cat(levels), BinnedTemperature(num_bins)
    )
    return calibrator, len(torch.cat(targets))


def summarize(name, values, reference):
    line = f"{name:<22}"
    for key in ("loc", "bg_abs", "bg_signed"):
        v = values[key]
        mean = float(torch.nanmean(v))
        if reference is None or values is reference:
            line += f"  {key}={mean:+.4f}{'':26}"
        else:
            ci = paired_bootstrap_ci(v, reference[key])
            line += f"  {key}={mean:+.4f} (Δ {ci.mean_difference:+.4f} [{ci.low:+.4f}, {ci.high:+.4f}])"
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="cluttered_cnn")
    parser.add_argument("--images", type=int, default=30)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--patch", type=int, default=8)
    parser.add_argument("--fit-images", type=int, default=200)
    parser.add_argument("--per-bin", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"command: OMP_NUM_THREADS=1 {sys.executable} {' '.join(sys.argv)}")

    start = time.perf_counter()
    model = load_reference_model(args.model)
    dataset_name = "cluttered_digits" if args.model.startswith("cluttered") else "digits"
    kwargs = {"canvas_size": 64} if dataset_name == "cluttered_digits" else {}
    val = make_dataset(dataset_name, "val", **kwargs)
    test = make_dataset(dataset_name, "test", **kwargs)
    size = val.images.shape[-1]
    perturbation = Perturbation.patches(size, patch_size=args.patch, baseline="zeros")
    d = perturbation.num_features
    calibrator, num_fit = fit_calibrator(
        model, perturbation, val.images[: args.fit_images], val.labels[: args.fit_images], args.per_bin, 10, args.seed
    )
    print(
        f"model={args.model}, d={d} patches of {args.patch}px, fit on {num_fit} perturbed val samples "
        f"({time.perf_counter() - start:.0f}s)"
    )
    print("binned T (λ bins 0..9): " + " ".join(f"{t:.3g}" for t in calibrator.temperatures.tolist()))
    for method in ("lime", "kernel_shap"):
        print(
            f"T* {method}: "
            + ", ".join(
                f"{rule}={surrogate_temperature(calibrator, d, method, rule):.3g}"
                for rule in ("smaller", "mean", "larger")
            )
        )

    x, labels, boxes = test.images[: args.images], test.labels[: args.images], test.boxes[: args.images]
    with torch.no_grad():
        accuracy = float((model(x).argmax(-1) == labels).double().mean())
    background = torch.stack(
        [  # (n, d) patch equals the zero baseline everywhere
            torch.stack([(xi[:, perturbation.feature_mask == j] == 0).all() for j in range(d)]) for xi in x
        ]
    )
    print(
        f"{len(x)} test images, accuracy {accuracy:.3f}, background patches per image "
        f"{background.double().sum(1).mean():.1f}/{d}; target = true label; {args.samples} samples, seed {args.seed}"
    )

    variants = [("uncalibrated", None, "plain", "mean"), ("recalx plain", calibrator, "plain", "mean")] + [
        (f"recalx consistent-{rule}", calibrator, "consistent", rule) for rule in ("mean", "smaller", "larger")
    ]
    for method in ("lime", "kernel_shap"):
        results = {}
        for name, cal, mode, rule in variants:
            t0 = time.perf_counter()
            e = explain(
                model,
                x,
                perturbation,
                cal,
                labels,
                method=method,
                mode=mode,
                consistent_temperature=rule,
                num_samples=args.samples,
                seed=args.seed,
            )
            phi = e.attributions
            abs_total = phi.abs().sum(1)
            results[name] = {
                "loc": localization(e.maps, boxes),
                "bg_abs": (phi.abs() * background).sum(1) / abs_total,
                "bg_signed": (phi * background).sum(1) / background.sum(1).clamp_min(1) / phi.abs().mean(1),
                "evals": e.num_evaluations,
                "seconds": time.perf_counter() - t0,
            }
        print(f"\n{method}  (Δ = variant − recalx plain, 95% paired bootstrap CI over images)")
        reference = results["recalx plain"]
        for name, values in results.items():
            print(summarize(name, values, reference) + f"  evals={values['evals']}  {values['seconds']:.1f}s")


if __name__ == "__main__":
    main()
