"""Explaining at scale: throughput of the one-pass multi-variant sampler, peak memory of `explain` over a split,
mixed-precision distance, and (on a GPU) the projected time for 50,000 ImageNet images.

Run:  OMP_NUM_THREADS=1 python benchmarks/bench_explain_scale.py [--quick]

Prints:
  [1] model evaluations/s of Shapley sampling explaining uncalibrated + binned plain + binned consistent from one
      pass (``explain_variants``, one image at a time as ``explain`` runs it) vs a bare batched forward of the same
      model in the same run: timm resnet18 and vit_small_patch16_224 at 224², random weights, d = 196 patches
      (target ≥ 0.85×);
  [2] peak resident memory of ``ReCalXTrainer.explain`` (the CLI's code path, Lightning predict loop, shards and
      merge) over 2,000 vs 200 digits images, each in a fresh process (target: within 200 MB);
  [3] bf16-mixed vs fp32 attributions through the predict loop (reference digits CNN): max |difference| and
      Spearman rank correlation per image;
  [4] CUDA only: ViT-B/16 at 224², 25 permutations, explain vs bare forward (target ≥ 0.9×) and the projected time
      for 50,000 images; without a GPU it prints "not run, no GPU".
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from recalx_lightning import BinnedTemperature, Perturbation
from recalx_lightning.explain import explain_variants, spearman

ROOT = Path(__file__).resolve().parents[1]


def variants_of(calibrator):
    return {"uncalibrated/plain": (None, "plain"), "binned/plain": (calibrator, "plain"),
            "binned/consistent": (calibrator, "consistent")}


def throughput(model, device, permutations: int, per_eval: int, images: int, autocast: bool = False):
    """(explain evals/s, bare evals/s) for ``images`` images explained one at a time, all variants in one pass."""
    torch.manual_seed(0)
    perturbation = Perturbation.patches(224, patch_size=16)
    calibrator = BinnedTemperature(10)
    calibrator.set_log_temperatures(torch.linspace(0, 2, 10, dtype=torch.float64))
    calibrator.to(device)
    x = torch.randn(images, 3, 224, 224, device=device)
    batch = torch.randn(per_eval, 3, 224, 224, device=device)
    context = (torch.autocast(device.type, dtype=torch.bfloat16) if autocast else torch.autocast(device.type,
                                                                                                 enabled=False))

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def bare(evaluations: int) -> float:
        sync()
        start, done = time.perf_counter(), 0
        while done < evaluations:
            model(batch)
            done += per_eval
        sync()
        return done / (time.perf_counter() - start)

    with torch.no_grad(), context:
        model(batch)  # warm-up at the full batch size
        sync()
        before = bare(per_eval * 2)
        start, evaluations = time.perf_counter(), 0
        for i in range(images):
            result = explain_variants(model, x[i : i + 1], perturbation, variants_of(calibrator), target=0,
                                      num_samples=permutations, perturbations_per_eval=per_eval, seed=i)
            evaluations += result["binned/plain"].num_evaluations
        sync()
        explain_rate = evaluations / (time.perf_counter() - start)
        # the bare forward just before and after, over as many evaluations: load drifts on shared machines
        bare_rate = (before + bare(evaluations)) / 2
    return explain_rate, bare_rate, evaluations / images


def child_memory(num_images: int, output_dir: str, checkpoint: str) -> None:
    """Run ``ReCalXTrainer.explain`` over ``num_images`` digits positions; print peak RSS (MB) as JSON."""
    from recalx_lightning import PerturbationDataModule, ReCalXModule
    from recalx_lightning.calibration import PerturbedImages
    from recalx_lightning.lightning import connect
    from recalx_lightning.lightning.trainer import ReCalXTrainer

    torch.set_num_threads(1)
    data = PerturbationDataModule(dataset="digits", split="val", num_calibration_samples=20, num_eval_samples=200,
                                  eval_subsets_per_bin=1, batch_size=50)
    module = ReCalXModule(model="reference:digits_cnn")
    connect(module, data)
    split = data.datasets["evaluation"]
    # a split of num_images positions cycling over the 200 evaluation digits (each position has its own seed)
    cycled = [split.indices[i % len(split.indices)] for i in range(num_images)]
    data.datasets["evaluation"] = PerturbedImages(split.base, cycled, data.perturbation, 10, 1, split.seed)
    before = _status_mb("VmRSS")
    _reset_peak()
    trainer = ReCalXTrainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    trainer.explain(module, data, ckpt_path=checkpoint, num_samples=1, output_dir=output_dir, num_heatmaps=0)
    peak = _status_mb("VmHWM") if _reset_peak.supported else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"images": num_images, "peak_mb": peak, "before_mb": before}))


def _status_mb(field: str) -> float:
    """A /proc/self/status memory field in MB (Linux); 0 elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _reset_peak() -> None:
    """Reset the peak RSS (VmHWM) so that it measures ``explain`` alone (Linux; else the process peak is used)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        _reset_peak.supported = True
    except OSError:
        _reset_peak.supported = False


def digits_checkpoint(directory: Path) -> str:
    import lightning as L

    from recalx_lightning import PerturbationDataModule, ReCalXModule

    trainer = L.Trainer(max_epochs=1, num_sanity_val_steps=0, limit_val_batches=0, enable_progress_bar=False,
                        default_root_dir=directory, logger=False, enable_model_summary=False)
    trainer.fit(ReCalXModule(model="reference:digits_cnn"),
                PerturbationDataModule(dataset="digits", split="val", num_calibration_samples=20,
                                       num_eval_samples=200, eval_subsets_per_bin=1))
    return str(next(directory.rglob("*.ckpt")))


def memory(checkpoint: str, work: Path, sizes=(200, 2000)) -> dict[int, float]:
    peaks = {}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for n in sizes:
        out = subprocess.run([sys.executable, __file__, "--child-memory", str(n), "--checkpoint", checkpoint,
                              "--output-dir", str(work / f"explain_{n}")], env=env, capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(out.stderr[-2000:])
        peaks[n] = json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]
    return peaks


def mixed_precision(checkpoint: str, work: Path) -> tuple[float, float]:
    from recalx_lightning import PerturbationDataModule, ReCalXModule
    from recalx_lightning.lightning.trainer import ReCalXTrainer

    results = {}
    for precision in ("32-true", "bf16-mixed"):
        data = PerturbationDataModule(dataset="digits", split="val", num_calibration_samples=20,
                                      num_eval_samples=200, eval_subsets_per_bin=1)
        trainer = ReCalXTrainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                                precision=precision)
        with contextlib.redirect_stdout(io.StringIO()):  # keep the benchmark's own lines only
            trainer.explain(ReCalXModule(model="reference:digits_cnn"), data, ckpt_path=checkpoint, num_samples=5,
                            limit=32, output_dir=str(work / precision), num_heatmaps=0)
        results[precision] = torch.load(work / precision / "attributions.pt", weights_only=True)["binned/consistent"]
    a, b = results["32-true"], results["bf16-mixed"]
    return float((a - b).abs().max()), float(spearman(a, b).nanmean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 image, 1 permutation per CPU model (minutes)")
    parser.add_argument("--per-eval", type=int, default=64)
    parser.add_argument("--child-memory", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--output-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_memory:
        child_memory(args.child_memory, args.output_dir, args.checkpoint)
        return
    import timm

    torch.set_num_threads(1)
    print(f"command: OMP_NUM_THREADS=1 python benchmarks/bench_explain_scale.py {' '.join(sys.argv[1:])}")
    cpu = torch.device("cpu")
    permutations, images = (1, 1) if args.quick else (2, 2)
    for name in ("resnet18", "vit_small_patch16_224"):
        model = timm.create_model(name, pretrained=False).eval()
        rate, bare, per_image = throughput(model, cpu, permutations, args.per_eval, images)
        print(f"[1] {name} (CPU, 1 thread, {per_image:.0f} evaluations per image for 3 variants): explain "
              f"{rate:.1f} evals/s vs bare forward {bare:.1f} evals/s -> {rate / bare:.2f}x (target >= 0.85)")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        checkpoint = digits_checkpoint(work / "fit")
        peaks = memory(checkpoint, work)
        print(f"[2] peak RSS during `explain` (fresh process each): {peaks[200]:.0f} MB for 200 digits images, "
              f"{peaks[2000]:.0f} MB for 2,000 -> {peaks[2000] - peaks[200]:+.0f} MB (target within 200 MB)")
        max_abs, rho = mixed_precision(checkpoint, work)
        print(f"[3] bf16-mixed vs fp32 (digits CNN, 32 images, 5 permutations, binned/consistent): max |diff| "
              f"{max_abs:.2e}, mean Spearman rho {rho:.4f}")
    if not torch.cuda.is_available():
        print("[4] GPU (ViT-B/16, 25 permutations, projection for 50,000 images): not run, no GPU")
        return
    gpu = torch.device("cuda")
    model = timm.create_model("vit_base_patch16_224", pretrained=False).eval().to(gpu)
    for autocast in (False, True):
        rate, bare, per_image = throughput(model, gpu, 25, 256, 4, autocast=autocast)
        hours = 50_000 * per_image / rate / 3600
        print(f"[4] ViT-B/16 on {torch.cuda.get_device_name()} ({'bf16-mixed' if autocast else 'fp32'}): explain "
              f"{rate:,.0f} evals/s vs bare {bare:,.0f} -> {rate / bare:.2f}x (target >= 0.9); 50,000 images x "
              f"{per_image:.0f} evaluations: {hours:.1f} h on one GPU, {hours / 8:.1f} h on 8")


if __name__ == "__main__":
    main()
