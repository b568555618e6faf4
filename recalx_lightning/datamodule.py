"""Moved to :mod:`recalx_lightning.lightning.datamodule`; this alias keeps old imports and class paths working."""

import warnings
from typing import Any

from recalx_lightning.lightning import datamodule as _moved
from recalx_lightning.lightning.datamodule import PerturbationDataModule, PerturbedImages  # noqa: F401

warnings.warn(
    "`recalx_lightning.datamodule` moved to `recalx_lightning.lightning.datamodule`.", DeprecationWarning, stacklevel=2
)


def __getattr__(name: str) -> Any:
    return getattr(_moved, name)
