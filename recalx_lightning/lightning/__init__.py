"""Lightning integration: ReCalXModule, PerturbationDataModule (joined by connect), ExplanationQualityCallback,
ReCalXTrainer and the CLI.

The core (:func:`recalx_lightning.calibrate` and the rest of the top level) runs the same pipeline without Lightning;
this subpackage is the only part of the project that imports it. The CLI lives in
:mod:`recalx_lightning.lightning.cli` (not imported here: it pulls in jsonargparse).
"""

from recalx_lightning.lightning.callbacks import ExplanationQualityCallback
from recalx_lightning.lightning.datamodule import PerturbationDataModule, connect
from recalx_lightning.lightning.module import ReCalXModule
from recalx_lightning.lightning.trainer import ReCalXTrainer

__all__ = ["ExplanationQualityCallback", "PerturbationDataModule", "ReCalXModule", "ReCalXTrainer", "connect"]
