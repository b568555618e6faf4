"""Moved to :mod:`recalx_lightning.lightning.cli`; this alias keeps old imports and class paths working."""

import warnings
from typing import Any

from recalx_lightning.lightning import cli as _moved
from recalx_lightning.lightning.cli import ReCalXCLI, main  # noqa: F401

warnings.warn(
    "`recalx_lightning.cli` moved to `recalx_lightning.lightning.cli`.", DeprecationWarning, stacklevel=2
)


def __getattr__(name: str) -> Any:
    return getattr(_moved, name)
