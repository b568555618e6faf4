"""Deterministic train/val/test splits by sample index, shared by every embedded dataset."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.6, 0.2, 0.2)


def check_split(split: str) -> None:
    """Require one of ``train``, ``val``, ``test``."""
    if split not in SPLITS:
        raise ValueError(f"`split` must be one of {SPLITS}, got {split!r}.")


def split_indices(n: int, split: str, seed: int = 0, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> np.ndarray:
    """Sorted indices (m,) of ``split`` in a seeded permutation of ``range(n)``; the three splits partition it.

    The permutation depends only on ``(n, seed)``, so every dataset built on the same source samples (digits
    and cluttered digits) draws the same partition and the splits never share a source sample.
    """
    check_split(split)
    if len(fractions) != 3 or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(
            f"`fractions` must be three positive shares (train, val, test) summing to 1, got {tuple(fractions)}."
        )
    order = np.random.RandomState(seed).permutation(n)
    n_train = int(round(fractions[0] * n))
    n_val = int(round(fractions[1] * n))
    bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, n)}
    lo, hi = bounds[split]
    return np.sort(order[lo:hi])


def box_mask(box: Sequence[int], height: int, width: int) -> np.ndarray:
    """Boolean (height, width) mask of a half-open pixel box ``(x0, y0, x1, y1)``."""
    from recalx_lightning._boxes import boxes_to_masks

    return boxes_to_masks(torch.tensor([[int(v) for v in box]]), (height, width))[0].numpy()
