"""Datasets: embedded offline digits, cluttered digits and tabular sets, and ImageNet validation with annotations.

Every dataset returns ``(input tensor, label)`` from ``__getitem__``; image datasets built with
``return_annotations=True`` return a dict instead (``input``, ``label``, ``index``, ``box_mask``, ...).

    make_dataset(name, split, **kwargs)   one entry point; names in DATASETS
"""

from __future__ import annotations

import difflib

from torch.utils.data import Dataset

from recalx_lightning.data._splits import SPLITS, box_mask, split_indices
from recalx_lightning.data.digits import ClutteredDigitsDataset, DigitsDataset, load_digit_images
from recalx_lightning.data.imagenet import (
    AnnotationStats,
    ClassIndex,
    ImageNetValDataset,
    load_class_index,
    parse_voc_annotation,
)
from recalx_lightning.data.tabular import TABULAR_DATASETS, TabularDataset

DATASETS = ("digits", "cluttered_digits", "imagenet", *TABULAR_DATASETS)


def make_dataset(name: str, split: str = "val", **kwargs) -> Dataset:
    """Build a dataset by name.

    ``"digits"`` → :class:`DigitsDataset`, ``"cluttered_digits"`` → :class:`ClutteredDigitsDataset`,
    ``"breast_cancer" | "wine" | "synthetic"`` → :class:`TabularDataset`, ``"imagenet"`` →
    :class:`ImageNetValDataset` (``split`` is ignored: it is the validation set; pass ``root`` and
    ``class_index``). Extra keyword arguments go to the dataset's constructor.
    """
    if name == "digits":
        return DigitsDataset(split, **kwargs)
    if name == "cluttered_digits":
        return ClutteredDigitsDataset(split, **kwargs)
    if name in TABULAR_DATASETS:
        return TabularDataset(name, split, **kwargs)
    if name == "imagenet":
        missing = [k for k in ("root", "class_index") if k not in kwargs]
        if missing:
            raise ValueError(f"dataset 'imagenet' needs {missing}: the image folder and the class index file.")
        return ImageNetValDataset(**kwargs)
    close = difflib.get_close_matches(str(name), DATASETS, n=3, cutoff=0.4)
    hint = f" Did you mean {close}?" if close else ""
    raise ValueError(f"unknown dataset {name!r}; known: {list(DATASETS)}.{hint}")


__all__ = [
    "DATASETS",
    "SPLITS",
    "AnnotationStats",
    "ClassIndex",
    "ClutteredDigitsDataset",
    "DigitsDataset",
    "ImageNetValDataset",
    "TabularDataset",
    "box_mask",
    "load_class_index",
    "load_digit_images",
    "make_dataset",
    "parse_voc_annotation",
    "split_indices",
]
