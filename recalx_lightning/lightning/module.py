"""ReCalXModule: a frozen backbone whose per-level temperatures are fitted on cached perturbed logits.

Training (one epoch) runs the backbone exactly once per perturbed calibration sample, caches the logits, and in
its last step fits every calibrator on the cache (``fit_temperatures``: the exact Newton solver by default, the
paper's L-BFGS with ``fit_method: lbfgs`` — manual optimisation, only the temperatures are optimised).
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
import logging
import shutil
import warnings
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor, nn

from recalx_lightning._checks import check_positive_int
from recalx_lightning.calibrators import CALIBRATORS, TemperatureCalibrator, make_calibrator
from recalx_lightning.fitting import CachedObjective
from recalx_lightning.perturbation import Perturbation

CalibratorKind = Literal["binned", "smooth", "global"]
# The backbone is frozen in eval mode on purpose; Lightning would warn about it on every fit.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
# Temperatures and metrics are logged at epoch level (``log_fitted``), never subject to ``log_every_n_steps``;
# DataLoader workers are chosen per dataset by PerturbationDataModule (``num_workers: auto``).
warnings.filterwarnings("ignore", message=r"The number of training batches \(\d+\) is smaller than the logging")
warnings.filterwarnings("ignore", message=r"The '\w+' does not have many workers")
# Deprecations inside Lightning's own calls (printed once per process, nothing a user can change).
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_gather is deprecated")


class _DropLightningTips(logging.Filter):
    """Lightning's advertising tips (litlogger, litmodels) on every run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropLightningTips())


class ReCalXModule(L.LightningModule):
    """Fit and evaluate per-level temperatures for a frozen classifier.

    Args:
        model: a model spec for :func:`recalx_lightning.models.create_model` (``reference:digits_cnn``,
            ``timm:vit_base_patch16_224.augreg2_in21k_ft_in1k``, ``open_clip:ViT-B-16-SigLIP/webli``, ...).
        model_kwargs: extra arguments of that factory (``checkpoint_path``, ``pretrained``, ...).
        calibrator: the calibrator used downstream (explanations, export): ``binned`` (ReCalX), ``smooth``
            or ``global``.
        compare_calibrators: also fit the other kinds, for the report (cheap: they share the cached logits).
        num_bins: B; must equal the data module's.
        min_temperature, max_temperature: temperature bounds.
        fit_method: ``auto``/``newton`` (exact) or ``lbfgs`` (the paper's optimiser).
        forward_batch_size: rows per backbone forward when expanding images into their perturbations.
        checkpoint_backbone: store backbone weights in checkpoints (default: only temperatures; the backbone is
            rebuilt from its spec on load).

    The level definition the temperatures are fitted on and applied at (``"paper"`` or ``"effective"``) is the
    data module's ``level`` (:attr:`level`); it is stored in checkpoints, and a checkpoint fitted on one
    definition refuses data configured with the other.
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
    ) -> None:
        super().__init__()
        if calibrator not in CALIBRATORS:
            raise ValueError(f"`calibrator` must be one of {sorted(CALIBRATORS)}, got {calibrator!r}.")
        check_positive_int(num_bins, "num_bins")
        check_positive_int(forward_batch_size, "forward_batch_size")
        if fit_method not in ("auto", "newton", "lbfgs"):
            raise ValueError(f"`fit_method` must be 'auto', 'newton' or 'lbfgs', got {fit_method!r}.")
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

    # structure -----------------------------------------------------------------------------------------
    @property
    def calibrator(self) -> TemperatureCalibrator:
        """The main calibrator (``hparams.calibrator``)."""
        return self.calibrators[self.hparams.calibrator]

    @property
    def level(self) -> str:
        """The level definition in use: the attached data module's ``level``, else the fitted one."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        return getattr(getattr(datamodule, "hparams", None), "level", None) or self.fitted_level

    def levels(self, x: Tensor, keep: Tensor) -> Tensor:
        """Levels (b, P) of the keep rows (b, P, d) of images x (b, *S), under :attr:`level`."""
        informative = self.perturbation.informative_features(x, self.level)
        if informative is not None:
            informative = informative.unsqueeze(1).expand_as(keep).reshape(-1, keep.shape[-1])
        return self.perturbation.level(keep.reshape(-1, keep.shape[-1]), informative).view(keep.shape[:2])

    @property
    def perturbation(self) -> Perturbation:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or getattr(datamodule, "perturbation", None) is None:
            raise RuntimeError("ReCalXModule needs a PerturbationDataModule that has been set up.")
        return datamodule.perturbation

    def train(self, mode: bool = True) -> ReCalXModule:
        """Keep the backbone in eval mode (no dropout, no BatchNorm statistics updates) whatever Lightning asks."""
        super().train(mode)
        self.model.eval()
        return self

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """L-BFGS over the temperatures only (never the backbone: its L-BFGS history would be huge)."""
        return torch.optim.LBFGS(self.calibrators.parameters(), lr=1.0, max_iter=100, tolerance_grad=1e-9,
                                 tolerance_change=1e-15, history_size=20, line_search_fn="strong_wolfe")

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None:
            return
        if datamodule.hparams.num_bins != self.hparams.num_bins:
            raise ValueError(
                f"model.num_bins = {self.hparams.num_bins} but data.num_bins = {datamodule.hparams.num_bins}; "
                "set both to the same value."
            )
        from recalx_lightning.models.info import check_model_data

        calibration = datamodule.datasets["calibration"]
        check_model_data(self.model, calibration.base)
        sample_shape = tuple(calibration[0][0].shape)
        if sample_shape != tuple(self.model_info.input_size):
            raise ValueError(
                f"the data yields inputs of shape {sample_shape} but {self.hparams.model!r} expects "
                f"{tuple(self.model_info.input_size)}; use a model built for this data (or resize the data)."
            )

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

    def perturbed_logits(self, x: Tensor, keep: Tensor) -> Tensor:
        """Logits of every perturbation of every image: x (b, *S), keep (b, P, d) → (b, P, K).

        Rows are processed in chunks of ``forward_batch_size`` perturbed inputs.
        """
        b, p, d = keep.shape
        rows = keep.reshape(b * p, d)
        image_of_row = torch.arange(b, device=x.device).repeat_interleave(p)
        chunks = []
        step = self.hparams.forward_batch_size
        for start in range(0, b * p, step):
            images = x[image_of_row[start : start + step]]
            chunks.append(self.backbone(self.perturbation.apply(images, rows[start : start + step])))
        return torch.cat(chunks).view(b, p, -1)

    def _cache_batch(self, batch, with_clean: bool) -> None:
        x, labels, keep, index = batch
        entry = {
            "index": index,
            "labels": labels,
            "logits": self.perturbed_logits(x, keep).float(),
            "levels": self.levels(x, keep).to(x.device),
        }
        if with_clean:
            entry["clean"] = self.backbone(x).float()
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
        order = torch.argsort(local["index"], stable=True)
        index = local["index"][order]
        first = torch.ones_like(index, dtype=torch.bool)
        first[1:] = index[1:] != index[:-1]
        return {key: value[order][first] for key, value in local.items()}

    # training: cache once, fit at the last step ----------------------------------------------------------
    def training_step(self, batch, batch_idx: int) -> None:
        self._cache_batch(batch, with_clean=True)
        if batch_idx == self.trainer.num_training_batches - 1:
            cache = self.gathered_cache()
            with rank_zero_warnings(self.trainer):
                self.fit_calibrators(cache)

    def fit_calibrators(self, cache: dict[str, Tensor]) -> None:
        """Fit every calibrator on a gathered cache (logits (N, P, K), levels (N, P), labels (N,), clean (N, K)).

        Each calibrator is first solved on its own (``fit_method``), then one joint L-BFGS step of Lightning's
        optimiser over all temperatures runs on the same cached objective: with the exact solution it stops
        at once (a stationarity check); bins at a temperature bound are held there.
        """
        num_images, per_image = cache["levels"].shape
        logits = cache["logits"].reshape(num_images * per_image, -1)
        labels = cache["labels"].repeat_interleave(per_image)
        levels = cache["levels"].reshape(-1).double()
        self.fit_diagnostics, objectives = {}, {}
        for kind, calibrator in self.calibrators.items():
            data = (cache["clean"], cache["labels"], None) if kind == "global" else (logits, labels, levels)
            method = self.hparams.fit_method
            if method == "newton" and not calibrator.separable:
                method = "auto"
            objectives[kind] = CachedObjective(*data, calibrator)  # one float64 copy: fit, then the L-BFGS step
            self.fit_diagnostics[kind] = objectives[kind].fit(method).diagnostics.to_dict()
        optimizer = self.optimizers()

        def closure() -> Tensor:
            optimizer.zero_grad()
            loss = sum(objective() for objective in objectives.values())
            self.manual_backward(loss)
            for kind, calibrator in self.calibrators.items():
                hits = self.fit_diagnostics[kind]["bound_hits"]
                if hits and calibrator.log_temperature.grad is not None:
                    calibrator.log_temperature.grad[hits] = 0
            return loss

        no_sync = getattr(self.trainer.strategy.model, "no_sync", contextlib.nullcontext)
        with torch.inference_mode(False), torch.enable_grad(), no_sync():  # same objective on every rank
            optimizer.step(closure=closure)
        for kind, calibrator in self.calibrators.items():
            calibrator.set_log_temperatures(calibrator.log_temperature.detach(), warn_on_bounds=False)
            self.fit_diagnostics[kind]["temperatures"] = calibrator.temperatures.tolist()
            for b, t in enumerate(calibrator.temperatures.tolist()):
                self.log_fitted(f"temperature/{kind}/bin_{b}", t)
        self.fitted.fill_(True)
        self.fitted_level = self.level
        self.log_fitted("calibration_samples", float(logits.shape[0]))

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
        self._cache_batch(batch, with_clean=False)

    def test_step(self, batch, batch_idx: int) -> None:
        self._cache_batch(batch, with_clean=False)

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

        num_images, per_image = cache["levels"].shape
        calibrators: dict[str, TemperatureCalibrator | None] = {"uncalibrated": None, **self.calibrators}
        report = evaluate_calibrators(
            cache["logits"].reshape(num_images * per_image, -1),
            cache["labels"].repeat_interleave(per_image),
            cache["levels"].reshape(-1).double(),
            calibrators,
            num_bins=self.hparams.num_bins,
            level=self.level,
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
        checkpoint[SIGNATURE_KEY] = fit_signature(self, getattr(self._trainer, "datamodule", None))
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

            trainer = self._trainer
            datamodule, path = getattr(trainer, "datamodule", None), getattr(trainer, "ckpt_path", None)
            check_checkpoint(checkpoint, self, datamodule, path)
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
