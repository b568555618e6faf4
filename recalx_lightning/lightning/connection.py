"""The one hand-over between a :class:`ReCalXModule` and its :class:`PerturbationDataModule`.

Each side owns its settings: the module owns the model (its :class:`~recalx_lightning.models.ModelInfo` and
preprocessing), the data module owns everything about perturbing it (features, baseline, ``num_bins``,
``level``, the subsets). Neither reads the other through the trainer. :func:`connect` runs once per run, before
any sample is drawn:

1. it checks that both sides agree on ``num_bins`` (the CLI links ``model.init_args.num_bins`` to
   ``data.init_args.num_bins``, so there only the data side is set);
2. it hands the data module the model's info and preprocessing (a ``raw`` baseline needs the model's mean/std,
   ``grid: model`` its patch grid, image folders its transform), and the data module builds the perturbation;
3. it checks the data against the model (class count, input shape) and hands the module the perturbation, the
   level definition and the data's part of the checkpoint signature.

A Lightning ``Trainer`` (plain or :class:`ReCalXTrainer`) connects through
:meth:`PerturbationDataModule.setup`, the first hook that sees both; outside a trainer (``explain``, scripts)
call :func:`connect` directly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from recalx_lightning.checkpoints import data_signature

if TYPE_CHECKING:
    from recalx_lightning.lightning.datamodule import PerturbationDataModule
    from recalx_lightning.lightning.module import ReCalXModule


def connect(module: ReCalXModule, datamodule: PerturbationDataModule) -> None:
    """Connect ``module`` and ``datamodule`` (idempotent); raises ``ValueError`` naming the setting that
    differs before any backbone forward."""
    if datamodule.hparams.num_bins != module.hparams.num_bins:
        raise ValueError(
            f"model.num_bins = {module.hparams.num_bins} but data.num_bins = {datamodule.hparams.num_bins}; "
            "set num_bins once, on the data (the command line links the model's to it)."
        )
    datamodule.use_model(module.model_info, module.model_transform)
    datamodule.build()
    calibration = datamodule.datasets["calibration"]
    from recalx_lightning.models.info import check_model_data

    check_model_data(module.model, calibration.base)
    sample_shape = tuple(calibration[0][0].shape)
    if sample_shape != tuple(module.model_info.input_size):
        raise ValueError(
            f"the data yields inputs of shape {sample_shape} but {module.hparams.model!r} expects "
            f"{tuple(module.model_info.input_size)}; use a model built for this data (or resize the data)."
        )
    module.use_data(datamodule.perturbation, datamodule.hparams.level,
                    data_signature(datamodule.perturbation, datamodule.hparams))
