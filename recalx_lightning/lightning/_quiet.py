"""Silence Lightning messages a ReCalX user cannot act on; called when a run is set up, never at import."""

from __future__ import annotations

import logging
import warnings

_IGNORED_WARNINGS = (
    # The backbone is frozen in eval mode on purpose; Lightning would warn about it on every fit.
    r"Found \d+ module\(s\) in eval mode at the start of training",
    # Temperatures and metrics are logged at epoch level (``log_fitted``), never subject to ``log_every_n_steps``;
    # DataLoader workers are chosen per dataset by PerturbationDataModule (``num_workers: auto``).
    r"The number of training batches \(\d+\) is smaller than the logging",
    r"The '\w+' does not have many workers",
    # Deprecations inside Lightning's own calls (printed once per process, nothing a user can change).
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    r"torch\.distributed\.nn\.functional\.all_gather is deprecated",
    # Temperatures are solved on the cached logits, not by a Lightning optimiser.
    "`LightningModule.configure_optimizers` returned `None`",
    # The explain job streams its results to shards on purpose.
    "predict returned None",
)


class _DropLightningTips(logging.Filter):
    """Lightning's advertising tips (litlogger, litmodels) on every run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


_TIPS_FILTER = _DropLightningTips()


def quiet_lightning() -> None:
    """Install the warning filters and the tips filter (idempotent: neither is added twice)."""
    for message in _IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_TIPS_FILTER)
