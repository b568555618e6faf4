"""Lightning speed targets, one CPU thread.

    OMP_NUM_THREADS=1 python benchmarks/bench_lightning.py [--images 100 --subsets 10]

1. Backbone forwards per perturbed calibration sample: exactly 1 (counted by the module).
2. ``trainer.fit`` wall time (data loading, perturbing, forwards, fitting every calibrator) against a bare
   batched forward over the same perturbed samples (the data module's calibration split through
   ``recalx_lightning.calibration.perturbed_logits``, one forward per loader batch): target ≤ 1.2×; samples/s.
3. Where to perturb: in the dataset item (B·M perturbed copies per image travel through the loader, the
   alternative design timed here) vs on the device from (image, keep matrix) — the data module's choice.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import parse_settings  # noqa: E402

from recalx_lightning import PerturbationDataModule, ReCalXModule  # noqa: E402
from recalx_lightning.calibration import perturbed_logits  # noqa: E402


class PerturbedCopies(Dataset):
    """The alternative design: each item is already the (B·M, *S) stack of perturbed inputs."""

    def __init__(self, images) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        x, y, keep, index = self.images[i]
        return self.images.perturbation.apply(x[None], keep), y


def main() -> None:
    args = parse_settings(__doc__, images=100, subsets=10, model="reference:digits_cnn")
    datamodule = PerturbationDataModule(dataset="digits", num_calibration_samples=args.images, num_eval_samples=1,
                                        subsets_per_bin=args.subsets, batch_size=10)
    module = ReCalXModule(model=args.model, forward_batch_size=1000)
    trainer = L.Trainer(max_epochs=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    start = time.perf_counter()
    trainer.fit(module, datamodule)
    fit_time = time.perf_counter() - start
    dataset = datamodule.datasets["calibration"]
    perturbed = args.images * 10 * args.subsets
    per_sample = (module.backbone_forwards - args.images) / perturbed
    print(f"perturbed calibration samples: {perturbed}; backbone forwards per perturbed sample: {per_sample:.3f} "
          f"(+{args.images} clean forwards for the global temperature)")

    def bare_forward() -> None:
        with torch.no_grad():
            for x, _, keep, _ in DataLoader(dataset, batch_size=10):
                perturbed_logits(module.model, datamodule.perturbation, x, keep, batch_size=x.shape[0] * keep.shape[1])

    start = time.perf_counter()
    bare_forward()
    bare = time.perf_counter() - start
    print(f"trainer.fit: {fit_time:.2f} s ({perturbed / fit_time:.0f} samples/s); bare batched forward over the same "
          f"perturbed samples: {bare:.2f} s ({perturbed / bare:.0f} samples/s); ratio {fit_time / bare:.2f}×  "
          "target ≤ 1.2×")

    start = time.perf_counter()
    with torch.no_grad():
        for stack, _ in DataLoader(PerturbedCopies(dataset), batch_size=10):
            module.model(stack.flatten(0, 1))
    in_dataset = time.perf_counter() - start
    print(f"perturb in the dataset item: {in_dataset:.2f} s vs on the device from keep matrices: {bare:.2f} s")


if __name__ == "__main__":
    main()
