"""Moved to :mod:`recalx_lightning.lightning.trainer`; this alias keeps old imports and class paths working."""

import warnings
from typing import Any

from recalx_lightning.lightning import trainer as _moved
from recalx_lightning.lightning.trainer import ReCalXTrainer  # noqa: F401

warnings.warn(
    "`recalx_lightning.trainer` moved to `recalx_lightning.lightning.trainer`.", DeprecationWarning, stacklevel=2
)


def __getattr__(name: str) -> Any:
    return getattr(_moved, name)
