"""ReCalXModule: a frozen backbone whose per-level temperatures are fitted on cached perturbed logits.

Training (one epoch) runs the backbone exactly once per perturbed calibration sample, caches the logits, and in
its last step fits every calibrator on the cache with the Lightning-free pipeline of
:mod:`recalx_lightning.calibration` (the exact per-bin Newton solve by default, the paper's L-BFGS with
``fit_method: lbfgs``; only the temperatures are optimised, on the cached logits, with no Lightning optimiser).
Validation and test evaluate fresh perturbed samples under every calibrator and log/write the calibration
report. Under DDP each rank computes its share; caches are all-gathered, de-duplicated by sample index and
sorted, so the temperatures do not depend on the number of processes.

Calibrators compared (the main one, ``calibrator``, is the one used for explanations):

* ``global``: classic temperature scaling fitted on the *clean* calibration images (one extra forward per image)
* ``binned``: ReCalX_TS, one temperature per level bin
* ``smooth``: log T piecewise linear in the level
"""

from __future__ import annotations

import contextlib
import json
import shutil
import warnings
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor, nn

from recalx_lightning._checks import check_finite, check_positive_int
from recalx_lightning.calibration import cache_batch, deduplicate, fit_calibrators, flat_samples
from recalx_lightning.calibrators import CALIBRATORS, TemperatureCalibrator, make_calibrator
from recalx_lightning.fitting import check_fit_method
from recalx_lightning.lightning._quiet import quiet_lightning
from recalx_lightning.perturbation import Perturbation

CalibratorKind = Literal["binned", "smooth", "global"]


class ReCalXModule(L.LightningModule):
    """Fit and evaluate per-level temperatures for a frozen classifier.

    Args:
        model: a model spec for :func:`recalx_lightning.models.create_model` (``reference:digits_cnn``,
            ``timm:vit_base_patch16_224.augreg2_in21k_ft_in1k``, ``open_clip:ViT-B-16-SigLIP/webli``, ...).
        model_kwargs: extra arguments of that factory (``checkpoint_path``, ``pretrained``, ...).
        calibrator: the calibrator used downstream (explanations, export): ``binned`` (ReCalX), ``smooth``
            or ``global``.
        compare_calibrators: also fit the other kinds, for the report (cheap: they share the cached logits).
        num_bins: B; must equal the data module's (the command line sets it once, on the data).
        min_temperature, max_temperature: temperature bounds.
        fit_method: ``auto``/``newton`` (exact) or ``lbfgs`` (the paper's optimiser).
        forward_batch_size: rows per backbone forward when expanding images into their perturbations.
        checkpoint_backbone: store backbone weights in checkpoints (default: only temperatures; the backbone is
            rebuilt from its spec on load).
        report_options: options of the validation/test report
            (:func:`~recalx_lightning.report.evaluate_calibrators`): ``kl_variants`` (e.g. ``[top_label]`` to
            skip the canonical estimator at K = 1,000), ``floor_resamples`` and ``se_subsamples`` (each floor or
            standard error costs that many extra estimates; 0 disables it), ``ece_bins``, ``bandwidth``,
            ``bandwidth_grid``, ``block_size``.

    The perturbation and the level definition the temperatures are fitted on and applied at (``"paper"`` or
    ``"effective"``) belong to the data module, which hands them over once per run
    (:func:`~recalx_lightning.lightning.datamodule.connect`); the level is stored in checkpoints, and a checkpoint
    fitted on one definition refuses data configured with the other.
    """

    def __init__(
        self,
        model: str = "reference:digits_cnn",
        model_kwargs: dict[str, Any] | None = None,
        calibrator: CalibratorKind = "binned",
        compare_calibrators: bool = True,
        num_bins: int = 10,
        min_temperature: float = 0.05,
        max_temperature: float = 100.0,
        fit_method: Literal["auto", "newton", "lbfgs"] = "auto",
        forward_batch_size: int = 1024,
        checkpoint_backbone: bool = False,
        report_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if calibrator not in CALIBRATORS:
            raise ValueError(f"`calibrator` must be one of {sorted(CALIBRATORS)}, got {calibrator!r}.")
        check_positive_int(num_bins, "num_bins")
        check_positive_int(forward_batch_size, "forward_batch_size")
        check_fit_method(fit_method, "fit_method")
        from recalx_lightning.report import check_report_options

        check_report_options(report_options or {}, "report_options")
        quiet_lightning()
        self.save_hyperparameters()
        self.automatic_optimization = False
        from recalx_lightning.models import create_model, model_info
        from recalx_lightning.models.info import create_transform

        self.model = create_model(model, **(model_kwargs or {}))
        self.model.eval().requires_grad_(False)
        self.model_info = model_info(self.model)
        self.model_transform = create_transform(self.model)
        kinds = list(CALIBRATORS) if compare_calibrators else [calibrator]
        bounds = {"min_temperature": min_temperature, "max_temperature": max_temperature}
        self.calibrators = nn.ModuleDict({k: make_calibrator(k, num_bins=num_bins, **bounds) for k in kinds})
        self.register_buffer("fitted", torch.tensor(False))
        self.backbone_forwards = 0
        self.fitted_level: str = "paper"
        self.fit_diagnostics: dict[str, dict] = {}
        self._cache: list[dict[str, Tensor]] = []
        self._perturbation: Perturbation | None = None
        self._data_level: str | None = None
        self.data_signature: dict[str, Any] | None = None

    # structure -----------------------------------------------------------------------------------------
    @property
    def calibrator(self) -> TemperatureCalibrator:
        """The main calibrator (``hparams.calibrator``)."""
        return self.calibrators[self.hparams.calibrator]

    @property
    def level(self) -> str:
        """The level definition in use: the connected data module's ``level``, else the fitted one."""
        return self._data_level or self.fitted_level

    @property
    def perturbation(self) -> Perturbation:
        """The connected data module's perturbation (see :func:`~recalx_lightning.lightning.datamodule.connect`)."""
        if self._perturbation is None:
            raise RuntimeError(
                "ReCalXModule is not connected to a PerturbationDataModule: run it through a Trainer with one, "
                "or call recalx_lightning.lightning.connect(module, datamodule)."
            )
        return self._perturbation

    def use_data(self, perturbation: Perturbation, level: str, signature: dict[str, Any]) -> None:
        """Take the data's side of the hand-over (:func:`~recalx_lightning.lightning.datamodule.connect`): the
        perturbation, the level definition and the data's part of the checkpoint signature."""
        self._perturbation, self._data_level, self.data_signature = perturbation, level, signature

    def train(self, mode: bool = True) -> ReCalXModule:
        """Keep the backbone in eval mode (no dropout, no BatchNorm statistics updates) whatever Lightning asks."""
        super().train(mode)
        self.model.eval()
        return self

    def configure_optimizers(self) -> None:
        """No gradient optimiser: the temperatures are solved on the cached logits in the last training step
        (Lightning then supplies a placeholder that only counts the step)."""
        return None

    # forward passes -------------------------------------------------------------------------------------
    def forward(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        """Recalibrated class probabilities (n, K) with the main calibrator (see RecalibratedClassifier)."""
        if keep is None:
            return self.calibrator(self.backbone(x)).softmax(-1)
        logits = self.backbone(self.perturbation.apply(x, keep))
        levels = self.perturbation.level(keep, self.perturbation.informative_features(x, self.level))
        return self.calibrator(logits, levels.to(logits.device)).softmax(-1)

    def backbone(self, x: Tensor) -> Tensor:
        """The frozen model's logits (n, K), counted in ``backbone_forwards``."""
        self.backbone_forwards += x.shape[0]
        with torch.no_grad():
            return self.model(x)

    def _cache_batch(self, batch, with_clean: bool, first: bool) -> None:
        """Cache one batch's perturbed logits; the first batch of a loop is checked to be finite, so a model
        that outputs NaN fails before the rest of the run (one check per loop keeps the hot path sync-free)."""
        entry = cache_batch(self.backbone, self.perturbation, batch, self.level, with_clean,
                            self.hparams.forward_batch_size)
        if first:
            check_finite(entry["logits"], "model logits on perturbed inputs",
                         fix="Check the backbone's weights and preprocessing (e.g. BatchNorm statistics).")
        self._cache.append(entry)

    def gathered_cache(self) -> dict[str, Tensor]:
        """The cache of all ranks, de-duplicated by sample index (DDP pads with repeats) and sorted by it."""
        if not self._cache:
            raise RuntimeError("no samples were processed; is the data split empty?")
        local = {key: torch.cat([entry[key] for entry in self._cache]) for key in self._cache[0]}
        self._cache = []
        if self.trainer is not None and self.trainer.world_size > 1:
            gathered = self.all_gather(local)
            local = {key: value.flatten(0, 1) for key, value in gathered.items()}
        return deduplicate(local)

    # training: cache once, fit at the last step ----------------------------------------------------------
    def training_step(self, batch, batch_idx: int) -> None:
        self._cache_batch(batch, with_clean=True, first=batch_idx == 0)
        if batch_idx == self.trainer.num_training_batches - 1:
            cache = self.gathered_cache()
            with rank_zero_warnings(self.trainer):
                self.fit_calibrators(cache)
            # The solve is the run's one optimisation step: Lightning's step counter (which names checkpoints and
            # lets ModelCheckpoint save) advances; the placeholder optimiser updates nothing.
            self.optimizers().step()

    def fit_calibrators(self, cache: dict[str, Tensor]) -> None:
        """Fit every calibrator on a gathered cache (logits (N, P, K), levels (N, P), labels (N,), clean (N, K))
        with :func:`recalx_lightning.calibration.fit_calibrators`: the exact per-bin solve (``fit_method: auto``
        or ``newton``) or the paper's L-BFGS (``lbfgs``), on the cached logits only."""
        self.fit_diagnostics = fit_calibrators(cache, self.calibrators, self.hparams.fit_method)
        for kind, diagnostics in self.fit_diagnostics.items():
            for b, t in enumerate(diagnostics["temperatures"]):
                self.log_fitted(f"temperature/{kind}/bin_{b}", t)
        self.fitted.fill_(True)
        self.fitted_level = self.level
        self.log_fitted("calibration_samples", float(cache["levels"].numel()))

    def log_fitted(self, name: str, value: float) -> None:
        """Log a value every rank holds identically, at epoch level (written whatever ``log_every_n_steps`` and
        the number of batches; ``sync_dist`` averages equal values and keeps DDP from warning per key)."""
        self.log(name, value, on_step=False, on_epoch=True, sync_dist=True)

    def on_fit_end(self) -> None:
        log_dir = run_directory(self.trainer)
        if self.trainer.is_global_zero and log_dir and self.fitted:
            directory = Path(log_dir)
            self.calibrator.save(directory / "calibrator.pt")
            (directory / "fit_diagnostics.json").write_text(json.dumps(self.fit_diagnostics, indent=2))

    # evaluation ------------------------------------------------------------------------------------------
    def validation_step(self, batch, batch_idx: int) -> None:
        self._cache_batch(batch, with_clean=False, first=batch_idx == 0)

    def test_step(self, batch, batch_idx: int) -> None:
        self._cache_batch(batch, with_clean=False, first=batch_idx == 0)

    def on_validation_epoch_end(self) -> None:
        with rank_zero_warnings(self.trainer):
            self._evaluate("val")

    def on_test_epoch_end(self) -> None:
        with rank_zero_warnings(self.trainer):
            self._evaluate("test")

    def _evaluate(self, stage: str) -> None:
        if self.trainer.sanity_checking:
            self._cache = []
            return
        cache = self.gathered_cache()
        if not bool(self.fitted):
            warnings.warn("evaluating unfitted temperatures (all T = 1): run `fit` or pass --ckpt_path.", stacklevel=2)
        from recalx_lightning.report import evaluate_calibrators

        calibrators: dict[str, TemperatureCalibrator | None] = {"uncalibrated": None, **self.calibrators}
        report = evaluate_calibrators(
            *flat_samples(cache),
            calibrators,
            num_bins=self.hparams.num_bins,
            level=self.level,
            **(self.hparams.report_options or {}),
        )
        self.last_report = report
        for name, value in report_scalars(report).items():
            self.log_fitted(f"{stage}/{name}", value)
        log_dir = run_directory(self.trainer)
        if self.trainer.is_global_zero and log_dir is not None:
            self._write_report(report, stage, log_dir)

    def _write_report(self, report, stage: str, log_dir: str) -> None:
        stem = "calibration_report" if stage == "val" else f"calibration_report_{stage}"
        report.save(Path(log_dir), stem=stem)
        experiment = getattr(self.logger, "experiment", None)
        if experiment is not None and hasattr(experiment, "add_figure"):
            experiment.add_figure(f"{stage}/calibration_error_vs_level", report.figure_error_vs_level(),
                                  global_step=self.global_step)
            experiment.add_figure(f"{stage}/reliability", report.figure_reliability(), global_step=self.global_step)

    # checkpoints -----------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep checkpoints small: temperatures (+ model info); backbone weights only if asked."""
        from recalx_lightning.checkpoints import SIGNATURE_KEY, fit_signature

        checkpoint["model_info"] = self.model_info.to_dict()
        checkpoint["fit_diagnostics"] = self.fit_diagnostics
        checkpoint[SIGNATURE_KEY] = fit_signature(self)
        checkpoint["level"] = self.fitted_level
        if not self.hparams.checkpoint_backbone:
            state = checkpoint["state_dict"]
            for key in [k for k in state if k.startswith("model.")]:
                del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any], checked: bool = False) -> None:
        """Refuse a checkpoint fitted for another model/class count/bins/perturbation than this run's
        (:func:`~recalx_lightning.checkpoints.check_checkpoint`, unless ``checked``), then fill in the backbone
        weights from the spec-built model when the checkpoint does not hold them."""
        if not checked:
            from recalx_lightning.checkpoints import check_checkpoint

            check_checkpoint(checkpoint, self, getattr(self._trainer, "ckpt_path", None))
        state = checkpoint["state_dict"]
        if not any(k.startswith("model.") for k in state):
            state.update({f"model.{k}": v for k, v in self.model.state_dict().items()})
        self.fit_diagnostics = checkpoint.get("fit_diagnostics", {})
        self.fitted_level = checkpoint.get("level", "paper")

    def export_calibrator(self, path: str | Path) -> Path:
        """Write the main calibrator to a small file, loadable with ``load_calibrator`` (no Lightning)."""
        return self.calibrator.save(path)


@contextlib.contextmanager
def rank_zero_warnings(trainer):
    """Show warnings from global rank zero only: every rank fits and evaluates the same gathered cache, so the
    other ranks would repeat the same warnings."""
    if trainer is None or trainer.is_global_zero:
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def run_directory(trainer) -> str | None:
    """The run's log directory, or None without a logger (then nothing is written to the working directory).

    ``trainer.log_dir`` is a collective under DDP: every rank must call this.
    """
    return trainer.log_dir if trainer.loggers else None


def report_scalars(report) -> dict[str, float]:
    """Flat metric names for logging: ``<calibrator>/<metric>/bin_<b>`` and ``<calibrator>/<summary>``."""
    scalars: dict[str, float] = {}
    for name, rows in report.rows.items():
        summary = report.summaries[name]
        scalars[f"{name}/kl_ce_max"] = summary.kl_ce_max
        scalars[f"{name}/ece_max"] = summary.ece_max
        scalars[f"{name}/kl_ce_reduction"] = summary.kl_ce_reduction
        for variant in ("kl_ce_top_label", "kl_ce_classwise"):
            scalars[f"{name}/{variant}_max"] = getattr(summary, f"{variant}_max")
            scalars[f"{name}/{variant}_reduction"] = getattr(summary, f"{variant}_reduction")
        for b, row in enumerate(rows):
            for metric in ("kl_ce", "kl_ce_floor", "kl_ce_se", "kl_ce_top_label", "kl_ce_top_label_floor",
                           "kl_ce_top_label_se", "kl_ce_classwise", "kl_ce_classwise_floor", "kl_ce_classwise_se",
                           "ece", "nll", "accuracy", "temperature"):
                scalars[f"{name}/{metric}/bin_{b}"] = getattr(row, metric)
    return {k: float(v) for k, v in scalars.items() if v == v}


def remove_unfinished_run(log_dir: str | Path | None) -> None:
    """Delete a run directory that holds no result (no report, no checkpoint), e.g. after a config error."""
    if log_dir is None:
        return
    path = Path(log_dir)
    if path.is_dir() and not any(path.glob("calibration_report*.json")) and not any(path.rglob("*.ckpt")):
        shutil.rmtree(path, ignore_errors=True)
