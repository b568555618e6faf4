"""Core speed targets, one CPU thread.

    OMP_NUM_THREADS=1 python benchmarks/bench_core.py [--samples 20000 --classes 1000 --lbfgs]

1. ``fit_temperatures`` on cached logits, 10 bins: target < 3 s (Newton); L-BFGS (the paper's) for comparison.
2. ``RecalibratedClassifier`` overhead over the bare model on the same perturbed batch (256): target < 3 %.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from recalx_lightning import BinnedTemperature, Perturbation, RecalibratedClassifier, fit_temperatures


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_fit(samples: int, classes: int, with_lbfgs: bool) -> None:
    g = torch.Generator().manual_seed(0)
    levels = torch.rand(samples, generator=g, dtype=torch.float64)
    logits = torch.randn(samples, classes, generator=g) * 4
    probs = (logits.double() / (1 + 8 * levels)[:, None]).softmax(1)
    labels = torch.multinomial(probs, 1, generator=g).squeeze(1)
    one_pass = best_of(lambda: torch.logsumexp(logits.double(), 1), 3)
    result = {}
    newton = best_of(lambda: result.update(newton=fit_temperatures(logits, labels, levels, "binned")), 3)
    diagnostics = result["newton"].diagnostics
    print(f"fit_temperatures n={samples} K={classes} B=10  one logsumexp pass (float64): {one_pass:.3f} s")
    print(f"  newton : {newton:.3f} s  ({diagnostics.iterations} passes, "
          f"converged={diagnostics.converged})  target < 3 s")
    if with_lbfgs:
        lbfgs = best_of(lambda: result.update(lbfgs=fit_temperatures(logits, labels, levels, "binned",
                                                                     method="lbfgs")), 1)
        gap = (result["lbfgs"].calibrator.log_temperature - result["newton"].calibrator.log_temperature).abs().max()
        print(f"  lbfgs  : {lbfgs:.3f} s  ({result['lbfgs'].diagnostics.iterations} evaluations)  "
              f"max |Δ log T| vs newton = {gap:.2e}  speed-up {lbfgs / newton:.1f}×")


def bench_overhead(batch: int) -> None:
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(512, 10),
    ).eval()
    perturbation = Perturbation.patches(32, patch_size=4)
    calibrator = BinnedTemperature()
    calibrator.set_log_temperatures(torch.linspace(0, 3, 10, dtype=torch.float64))
    classifier = RecalibratedClassifier(model, calibrator, perturbation)
    x = torch.rand(batch, 1, 32, 32)
    keep = perturbation.sample_keep(batch, 5, 10, torch.Generator().manual_seed(0))
    with torch.inference_mode():
        bare = best_of(lambda: model(perturbation.apply(x, keep)).softmax(-1), 30)
        recalibrated = best_of(lambda: classifier(x, keep), 30)
    print(f"RecalibratedClassifier batch {batch}, small CNN on 32×32: bare {bare * 1e3:.2f} ms, "
          f"recalibrated {recalibrated * 1e3:.2f} ms, overhead {100 * (recalibrated / bare - 1):+.2f} %  target < 3 %")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--classes", type=int, default=1_000)
    parser.add_argument("--lbfgs", action="store_true", help="also time the paper's L-BFGS (slow)")
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(1)
    bench_fit(args.samples, args.classes, args.lbfgs)
    bench_overhead(args.batch)


if __name__ == "__main__":
    main()
