"""Uncalibrated vs ReCalX plain vs ReCalX consistent LIME / KernelSHAP on cluttered digits.

Run:  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_surrogate_consistent.py [--images 30] [--samples 500]

Steps: the reference CNN (``cluttered_cnn``, trained and cached on first use, ~100 s; ``--model digits_cnn`` for
the 32×32 digits); a BinnedTemperature (B = 10) fitted by ``recalx_lightning.calibration.calibrate`` (the
pipeline of ``fit``, subsets from ``split_seed(seed, "calibration")``) on perturbed validation images
(``--fit-images`` images × ``--per-bin`` random subsets per level bin, zero baseline, patches of ``--patch`` px);
then ``--images`` test images explained with LIME (ridge surrogate) and KernelSHAP, each
uncalibrated, with ReCalX temperatures at each coalition's own level (plain) and with ReCalX consistent (one
shared T*, rules mean/smaller/larger). Same seed, hence the same coalitions, for every variant.

Prints per method and variant (means over images, 95% paired bootstrap CI of the difference to plain):
  loc       localization: share of positive attribution inside the target digit's box
  bg|φ|     share of absolute attribution on background patches (patches equal to the baseline everywhere:
            replacing them changes nothing, so an ideal explanation gives them 0)
  bgφ/|φ|   mean signed attribution of background patches divided by the mean |φ| of all patches
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import parse_settings, summarize  # noqa: E402

from recalx_lightning import Perturbation  # noqa: E402
from recalx_lightning.calibration import calibrate  # noqa: E402
from recalx_lightning.data import make_dataset  # noqa: E402
from recalx_lightning.explain import explain, localization, surrogate_temperature  # noqa: E402
from recalx_lightning.models import load_reference_model  # noqa: E402


def main() -> None:
    args = parse_settings(__doc__, model="cluttered_cnn", images=30, samples=500, patch=8, fit_images=200, per_bin=10,
                          seed=0)
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
    fitted = calibrate(model, val, perturbation, calibrators=("binned",), num_bins=10, subsets_per_bin=args.per_bin,
                       indices=range(min(args.fit_images, len(val))), seed=args.seed, progress=False)
    calibrator, num_fit = fitted.calibrator, int(fitted.cache["levels"].numel())
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
    background = ~perturbation.informative(x)  # (n, d) patch equals the baseline everywhere
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
