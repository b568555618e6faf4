"""Moved to :mod:`recalx_lightning.lightning.module`; this alias keeps old imports and class paths working."""

import warnings
from typing import Any

from recalx_lightning.lightning import module as _moved
from recalx_lightning.lightning.module import ReCalXModule  # noqa: F401

warnings.warn(
    "`recalx_lightning.module` moved to `recalx_lightning.lightning.module`.", DeprecationWarning, stacklevel=2
)


def __getattr__(name: str) -> Any:
    return getattr(_moved, name)
