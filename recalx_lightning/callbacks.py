"""Moved to :mod:`recalx_lightning.lightning.callbacks`; this alias keeps old imports and class paths working."""

import warnings
from typing import Any

from recalx_lightning.lightning import callbacks as _moved
from recalx_lightning.lightning.callbacks import ExplanationQualityCallback  # noqa: F401

warnings.warn(
    "`recalx_lightning.callbacks` moved to `recalx_lightning.lightning.callbacks`.", DeprecationWarning, stacklevel=2
)


def __getattr__(name: str) -> Any:
    return getattr(_moved, name)
