"""ReCalXTrainer: Lightning's Trainer plus the ``explain`` subcommand."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L


class ReCalXTrainer(L.Trainer):
    """A :class:`lightning.Trainer` whose extra subcommands are methods (LightningCLI exposes them)."""

    def explain(
        self,
        model: L.LightningModule,
        datamodule: L.LightningDataModule,
        ckpt_path: str | None = None,
        indices: Sequence[int] = (0, 1, 2, 3, 4, 5, 6, 7),
        calibrators: Sequence[str] = ("uncalibrated", "binned"),
        modes: Sequence[str] = ("plain", "consistent"),
        method: str = "shapley_sampling",
        num_samples: int = 25,
        perturbations_per_eval: int = 64,
        seed: int = 0,
        output_dir: str | None = None,
    ) -> dict[str, Any]:
        """Explain evaluation images ``indices`` with the fitted temperatures of ``ckpt_path``.

        Writes ``explanations.json`` (attributions, per-image metrics, paired differences to uncalibrated with
        95% bootstrap CIs) and ``explanations_heatmaps.png`` to ``output_dir`` (default: the run's log dir).
        """
        from recalx_lightning.callbacks import evaluate_explanations, write_explanations

        if ckpt_path is not None:
            from recalx_lightning.checkpoints import restore_checkpoint

            restore_checkpoint(model, ckpt_path, datamodule)
        elif not bool(model.fitted):
            raise ValueError("`explain` needs fitted temperatures: pass --ckpt_path from a `fit` run.")
        datamodule.attach_model(model)
        datamodule.setup("validate")
        model.eval()
        result = evaluate_explanations(model, datamodule, list(indices), calibrators, modes, method, num_samples,
                                       perturbations_per_eval, seed)
        directory = Path(output_dir or self.log_dir or "explanations")
        paths = write_explanations(result, directory)
        print(json.dumps(result["summary"], indent=1))
        print(f"wrote {paths['json']} and {paths['heatmaps']}")
        return result
