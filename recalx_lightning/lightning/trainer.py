"""ReCalXTrainer: Lightning's Trainer plus the ``explain`` subcommand."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import lightning as L
from torch.utils.data import DataLoader

from recalx_lightning._checks import check_positive_int
from recalx_lightning.lightning._quiet import quiet_lightning
from recalx_lightning.lightning.datamodule import connect


class ReCalXTrainer(L.Trainer):
    """A :class:`lightning.Trainer` whose extra subcommands are methods (LightningCLI exposes them)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        quiet_lightning()
        super().__init__(*args, **kwargs)

    # Lightning's own signatures (the CLI builds its subcommands from them); a ckpt_path is read first.
    @functools.wraps(L.Trainer.fit)
    def fit(self, *args: Any, **kwargs: Any) -> None:
        return super().fit(**_checked_ckpt(L.Trainer.fit, args, kwargs))

    @functools.wraps(L.Trainer.validate)
    def validate(self, *args: Any, **kwargs: Any) -> Any:
        return super().validate(**_checked_ckpt(L.Trainer.validate, args, kwargs))

    @functools.wraps(L.Trainer.test)
    def test(self, *args: Any, **kwargs: Any) -> Any:
        return super().test(**_checked_ckpt(L.Trainer.test, args, kwargs))

    def explain(
        self,
        model: L.LightningModule,
        datamodule: L.LightningDataModule,
        ckpt_path: str | None = None,
        indices: Sequence[int] | None = None,
        calibrators: Sequence[str] = ("uncalibrated", "binned"),
        modes: Sequence[str] = ("plain", "consistent"),
        method: str = "shapley_sampling",
        num_samples: int = 25,
        perturbations_per_eval: int = 64,
        seed: int = 0,
        output_dir: str | None = None,
        limit: int | None = None,
        split: Literal["evaluation", "calibration", "test"] = "evaluation",
        batch_size: int | None = None,
        num_heatmaps: int = 8,
        weights_only: bool | None = None,
    ) -> dict[str, Any] | None:
        """Explain images of a split with the fitted temperatures of ``ckpt_path``, through the predict loop.

        Every ``<calibrator>/<mode>`` is scored from one pass of model evaluations per image, each image seeded
        by (``seed``, its position), so results do not depend on devices, batch size or order. Results stream
        to ``output_dir`` and a rerun resumes (see :mod:`recalx_lightning.lightning.explain_job`; the files:
        :mod:`recalx_lightning.explain.store`).

        Args:
            calibrators, modes, method, num_samples, perturbations_per_eval, seed: the explanation options, checked
                first, see :class:`~recalx_lightning.explain.ExplainSettings` (the level is the checkpoint's).
            indices: positions in the split to explain (default: the whole split); ``limit``: the first N of them.
            split: ``evaluation`` (the data module's evaluation images), ``calibration`` or ``test``.
            output_dir: default ``<run dir of the checkpoint>/explanations`` (or ``./explanations``).
            batch_size: images per predict batch (default: the data module's).
            num_heatmaps: images drawn in ``explanations_heatmaps.png`` (0: no figure).
            weights_only: accepted so that the config a ``fit`` run saved works as is; checkpoints are always
                read weights-only.

        Returns the merged summary (``explanations.json``'s content) on rank 0, ``None`` elsewhere.
        """
        from lightning.pytorch.callbacks import ProgressBar
        from lightning.pytorch.cli import SaveConfigCallback

        from recalx_lightning.explain import store
        from recalx_lightning.explain.study import ExplainSettings, explanation_variants
        from recalx_lightning.lightning import explain_job as job_lib

        options = ExplainSettings(calibrators, modes, method, num_samples, perturbations_per_eval, seed)
        if weights_only is False:
            raise ValueError("`--weights_only false` is refused: explain reads checkpoints weights-only; drop it.")
        if ckpt_path is None and not bool(model.fitted):
            raise ValueError("`explain` needs fitted temperatures: pass --ckpt_path from a `fit` run.")
        check_positive_int(num_heatmaps, "num_heatmaps", minimum=0)
        connect(model, datamodule)
        if ckpt_path is not None:
            from recalx_lightning.checkpoints import restore_checkpoint

            restore_checkpoint(model, ckpt_path)
        options = replace(options, level=model.level)
        if split not in ("evaluation", "calibration", "test"):
            raise ValueError(f"`split` must be 'evaluation', 'calibration' or 'test', got {split!r}.")
        images = datamodule._test_dataset() if split == "test" else datamodule.datasets[split]
        selection = _selection(indices, limit, len(images), split)
        variants = explanation_variants(model.calibrators, options.calibrators, options.modes)
        directory = Path(output_dir) if output_dir else _default_output_dir(ckpt_path)
        record = store.settings_record(
            options, variants, split=split, target="label", precision=str(self.precision),
            num_features=datamodule.perturbation.num_features, model=model.hparams.model,
            model_kwargs=model.hparams.model_kwargs,
            data={k: v for k, v in datamodule.hparams.items()
                  if k not in ("batch_size", "num_workers") and not k.startswith("_")},
            temperatures={k: c.log_temperature.detach().double().tolist() for k, c in model.calibrators.items()},
        )
        done = store.prepare_directory(directory, record)
        remaining = [p for p in selection if p not in done]
        model.eval()
        job = job_lib.ExplanationJob(model, images, datamodule.perturbation, variants, selection, directory,
                                     options, record, num_heatmaps)
        if not remaining:
            print(f"all {len(selection)} images are already explained in {directory}; merging.")
            job.run_id = "merge-only"
            return job.merge()
        if len(remaining) < self.world_size:  # every rank needs a batch; duplicates are dropped by the merge
            remaining = remaining + [remaining[0]] * (self.world_size - len(remaining))
        if len(done):
            print(f"resuming: {len(selection) - len(set(remaining))} of {len(selection)} images already explained.")
        loader = DataLoader(job_lib.SplitImages(images, remaining), shuffle=False,
                            batch_size=batch_size or datamodule.hparams.batch_size,
                            num_workers=datamodule.resolved_num_workers())
        bars = [c for c in self.callbacks if isinstance(c, ProgressBar)]
        for bar in bars:
            self.callbacks.remove(bar)
        if bars:
            self.callbacks.append(job_lib.ImageProgressBar(len(set(remaining))))
        self.callbacks[:] = [c for c in self.callbacks if not isinstance(c, SaveConfigCallback)]
        self.loggers = []
        self.predict_loop.inference_mode = False  # no_grad instead: Captum's surrogates reject inference tensors
        self.predict(job, dataloaders=loader, return_predictions=False)
        if self.is_global_zero:
            print(f"wrote {directory / 'attributions.pt'}, explanations.json, explanations.md"
                  + (", explanations_heatmaps.png" if num_heatmaps else ""))
        return job.summary


def _checked_ckpt(method: Any, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The call's arguments by name, after reading a ``ckpt_path`` file with the validated weights-only loader, so
    a truncated, foreign or hostile file fails in one line naming it (``"best"``/``"last"`` are Lightning's)."""
    import inspect

    bound = inspect.signature(method).bind(None, *args, **kwargs).arguments
    bound.pop("self", None)
    ckpt_path = bound.get("ckpt_path")
    if ckpt_path is not None and str(ckpt_path) not in ("best", "last", "hpc", "registry"):
        from recalx_lightning.checkpoints import load_checkpoint

        load_checkpoint(ckpt_path)
    return dict(bound)


def _default_output_dir(ckpt_path: str | None) -> Path:
    """``<run dir>/explanations`` for a checkpoint in ``<run dir>/checkpoints``, else ``./explanations``."""
    if ckpt_path is not None and Path(ckpt_path).parent.name == "checkpoints":
        return Path(ckpt_path).parent.parent / "explanations"
    return Path("explanations")


def _selection(indices: Sequence[int] | None, limit: int | None, size: int, split: str) -> list[int]:
    """Positions to explain, checked: inside the split, not empty, no repeats."""
    selection = list(range(size)) if indices is None else [int(i) for i in indices]
    if limit is not None:
        check_positive_int(limit, "limit")
        selection = selection[:limit]
    if not selection:
        raise ValueError(f"nothing to explain: the selection from the {split} split ({size} images) is empty; "
                         "check --indices / --limit.")
    bad = [i for i in selection if not 0 <= i < size]
    if bad:
        raise ValueError(f"--indices {bad[:5]} outside the {split} split: positions must lie in [0, {size}).")
    if len(set(selection)) != len(selection):
        raise ValueError("--indices repeats an image; list each position once.")
    return sorted(selection)
