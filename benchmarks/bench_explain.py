"""Speed of explain(): native Shapley sampling vs the bare model and vs Captum used the usual way.

Run:  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_explain.py [--device cpu|cuda] [--permutations 2]

Prints:
  1. model evaluations / s inside native Shapley sampling vs the bare batched forward of the same model
     (target ≥ 0.8×), for a tiny and a small CNN;
  2. (tiny model) native vs Captum ShapleyValueSampling called the usual way (per-pixel feature mask of patch ids on a
     224×224 image, same permutations and batch), target ≥ 5× faster;
  3. (tiny model) time added by recalibration (binned temperatures vs none), target < 3 %.
Timings are the best of ``--repeats`` runs.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import parse_settings  # noqa: E402

from recalx_lightning import BinnedTemperature, Perturbation  # noqa: E402
from recalx_lightning.explain import explain  # noqa: E402


def tiny_model() -> nn.Module:
    """~1 M multiply-adds per 224×224 image: building the perturbed input costs as much as the forward."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 8, stride=8), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    ).eval()


def small_model() -> nn.Module:
    """~35 M multiply-adds per image (a small CNN; ResNet-18 has ~1.8 G)."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(64, 10),
    ).eval()


MODELS = {"tiny": tiny_model, "small": small_model}


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    args = parse_settings(__doc__, device="cpu", permutations=2, per_eval=64, patch=16, repeats=3)
    torch.manual_seed(0)
    device = torch.device(args.device)
    x = torch.randn(1, 3, 224, 224, device=device)
    perturbation = Perturbation.patches(224, patch_size=args.patch)
    calibrator = BinnedTemperature(10)
    calibrator.set_log_temperatures(torch.linspace(0, 2, 10, dtype=torch.float64))
    calibrator.to(device)
    d = perturbation.num_features
    print(f"command: OMP_NUM_THREADS=1 {sys.executable} {' '.join(sys.argv)}")
    print(f"device={device}, threads={torch.get_num_threads()}, d={d} patches, P={args.permutations}, "
          f"perturbations_per_eval={args.per_eval}")

    batch = torch.randn(args.per_eval, 3, 224, 224, device=device)
    for name, build in MODELS.items():
        model = build().to(device)
        with torch.no_grad():
            bare_rate = args.per_eval / best_time(lambda: model(batch), args.repeats)  # noqa: B023
        run = explain(model, x, perturbation, calibrator, 0, num_samples=1, perturbations_per_eval=args.per_eval)
        native_rate = run.num_evaluations / best_time(
            lambda: explain(model, x, perturbation, calibrator, 0, num_samples=1,  # noqa: B023
                            perturbations_per_eval=args.per_eval), args.repeats)
        print(f"[1] {name} model: bare forward {bare_rate:,.0f} evals/s; inside Shapley sampling "
              f"{native_rate:,.0f} evals/s ({native_rate / bare_rate:.2f}x of bare, target >= 0.8)")

    model = tiny_model().to(device)

    def native(cal):
        return explain(model, x, perturbation, cal, 0, num_samples=args.permutations,
                       perturbations_per_eval=args.per_eval, seed=0)

    native_time = best_time(lambda: native(calibrator), args.repeats)
    uncalibrated_time = best_time(lambda: native(None), args.repeats)

    from captum.attr import ShapleyValueSampling

    pixel_mask = perturbation.feature_mask.to(device)[None, None]  # (1, 1, 224, 224) patch id of every pixel

    def captum_usual():
        torch.manual_seed(0)
        with torch.no_grad():
            return ShapleyValueSampling(lambda t: model(t).softmax(-1)).attribute(
                x, baselines=0.0, target=0, feature_mask=pixel_mask, n_samples=args.permutations,
                perturbations_per_eval=args.per_eval,
            )

    captum_time = best_time(captum_usual, 1)
    plain = explain(model, x, perturbation, None, 0, num_samples=args.permutations,
                    perturbations_per_eval=args.per_eval, seed=0)
    agree = (captum_usual()[0, 0] - plain.maps[0].to(device)).abs().max().item()
    print(f"[2] Captum usual way: {captum_time:.2f} s; native: {uncalibrated_time:.2f} s -> "
          f"{captum_time / uncalibrated_time:.1f}x faster (target >= 5); max |difference| = {agree:.1e}")
    overhead = native_time / uncalibrated_time - 1
    print(f"[3] recalibration: {native_time:.3f} s vs {uncalibrated_time:.3f} s uncalibrated -> "
          f"{100 * overhead:+.1f}% (target < 3%)")


if __name__ == "__main__":
    main()
