"""Embedded tabular data: scikit-learn breast cancer and wine, and synthetic data with known informative features.

Features are standardised with the mean and standard deviation of the *train* split (same ``seed``), so the
zero baseline is the training mean of every feature.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from recalx_lightning._checks import check_positive_int
from recalx_lightning.data._splits import DEFAULT_FRACTIONS, split_indices

TABULAR_DATASETS = ("breast_cancer", "wine", "synthetic")


def _load_arrays(
    name: str, n_samples: int, n_features: int, n_informative: int, n_classes: int, seed: int
) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray | None]:
    """Features (n, F), labels (n,), feature names and (synthetic only) the informative columns."""
    from sklearn import datasets

    if name == "breast_cancer":
        bunch = datasets.load_breast_cancer()
        return bunch.data, bunch.target, list(bunch.feature_names), None
    if name == "wine":
        bunch = datasets.load_wine()
        return bunch.data, bunch.target, list(bunch.feature_names), None
    check_positive_int(n_informative, "n_informative")
    if n_informative > n_features:
        raise ValueError(f"`n_informative` ({n_informative}) must not exceed `n_features` ({n_features}).")
    # shuffle=False puts the informative columns first; we then permute columns ourselves and record where.
    X, y = datasets.make_classification(
        n_samples=n_samples,
        n_features=n_features,
        n_informative=n_informative,
        n_redundant=0,
        n_repeated=0,
        n_classes=n_classes,
        n_clusters_per_class=1,
        class_sep=1.5,
        shuffle=False,
        random_state=seed,
    )
    perm = np.random.RandomState(seed + 1).permutation(n_features)
    X = X[:, perm]
    informative = np.sort(np.flatnonzero(perm < n_informative))
    names = [f"x{j}" for j in range(n_features)]
    rows = np.random.RandomState(seed + 2).permutation(n_samples)
    return X[rows], y[rows], names, informative


class TabularDataset(Dataset):
    """A tabular classification set returning ``(features (F,) float32, label)``.

    Args:
        name: ``"breast_cancer"`` (569 × 30, 2 classes), ``"wine"`` (178 × 13, 3 classes) or ``"synthetic"``
            (``make_classification`` with ``n_informative`` known informative features among ``n_features``).
        split: ``"train"``, ``"val"`` or ``"test"`` (seeded permutation by sample index).
        standardize: subtract the train-split mean and divide by its std (default).
        seed, fractions: split permutation and (train, val, test) shares; ``seed`` also seeds synthetic data.
        n_samples, n_features, n_informative, n_classes: synthetic data only.

    Attributes:
        features (n, F), labels (n,), feature_names, num_features, num_classes, mean (F,), std (F,),
        informative_features: indices of informative columns (synthetic) or ``None``.
    """

    def __init__(
        self,
        name: str,
        split: str = "train",
        standardize: bool = True,
        seed: int = 0,
        fractions: Sequence[float] = DEFAULT_FRACTIONS,
        n_samples: int = 2000,
        n_features: int = 20,
        n_informative: int = 5,
        n_classes: int = 3,
    ) -> None:
        if name not in TABULAR_DATASETS:
            raise ValueError(f"`name` must be one of {TABULAR_DATASETS}, got {name!r}.")
        X, y, names, informative = _load_arrays(name, n_samples, n_features, n_informative, n_classes, seed)
        train = split_indices(len(y), "train", seed, fractions)
        idx = split_indices(len(y), split, seed, fractions)
        if standardize:
            mean, std = X[train].mean(0), X[train].std(0)
            std = np.where(std > 0, std, 1.0)
        else:
            mean, std = np.zeros(X.shape[1]), np.ones(X.shape[1])
        self.name = name
        self.split = split
        self.features = torch.from_numpy(((X[idx] - mean) / std).astype(np.float32))
        self.labels = torch.from_numpy(y[idx].astype(np.int64))
        self.feature_names = names
        self.mean = torch.from_numpy(mean.astype(np.float32))
        self.std = torch.from_numpy(std.astype(np.float32))
        self.num_classes = int(y.max()) + 1
        self.informative_features = None if informative is None else torch.from_numpy(informative)

    @property
    def num_features(self) -> int:
        return self.features.shape[1]

    @property
    def input_size(self) -> tuple[int]:
        return (self.num_features,)

    def __len__(self) -> int:
        return self.features.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.features[index], int(self.labels[index])
