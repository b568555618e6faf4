"""Embedded, offline image data built from scikit-learn's 1,797 real 8×8 handwritten digits.

* :class:`DigitsDataset` — each digit upsampled to ``image_size``² (bilinear by default), one channel, values in
  [0, 1] with a black (0) background, plus a per-image stroke mask (pixels above ``stroke_threshold``).
* :class:`ClutteredDigitsDataset` — a localisation task: the target digit placed at a random position on a
  larger black canvas with distractor fragments cropped from *other* digits (of other classes), with the
  target's ground-truth box and stroke mask. Source digits are split exactly like :class:`DigitsDataset`
  (a seeded permutation by sample index), and distractors come from the same split, so train, val and test
  never share a source digit.

Inputs are raw pixels: models trained on them expect mean 0 / std 1 (no normalisation), so the zero
baseline equals the background.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from recalx_lightning._checks import check_positive_int
from recalx_lightning.data._splits import DEFAULT_FRACTIONS, box_mask, split_indices

Interpolation = Literal["bilinear", "nearest"]
DIGIT_CLASSES = tuple(str(d) for d in range(10))


def load_digit_images(image_size: int = 32, interpolation: Interpolation = "bilinear") -> tuple[Tensor, Tensor]:
    """All 1,797 sklearn digits as images (n, 1, image_size, image_size) in [0, 1] and labels (n,) int64."""
    from sklearn.datasets import load_digits

    check_positive_int(image_size, "image_size", minimum=8)
    if interpolation not in ("bilinear", "nearest"):
        raise ValueError(f"`interpolation` must be 'bilinear' or 'nearest', got {interpolation!r}.")
    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    if image_size != 8:
        kwargs = {"align_corners": False} if interpolation == "bilinear" else {}
        images = F.interpolate(images, size=(image_size, image_size), mode=interpolation, **kwargs)
    return images.clamp_(0.0, 1.0), torch.from_numpy(bunch.target.astype(np.int64))


def tight_box(mask: Tensor) -> tuple[int, int, int, int]:
    """Half-open box ``(x0, y0, x1, y1)`` around the True pixels of a (H, W) mask; (0, 0, 0, 0) if empty."""
    rows = torch.nonzero(mask.any(1)).flatten()
    cols = torch.nonzero(mask.any(0)).flatten()
    if rows.numel() == 0:
        return (0, 0, 0, 0)
    return (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)


class _AnnotatedImages(Dataset):
    """Shared accessors for in-memory image datasets with stroke masks and boxes."""

    images: Tensor  # (n, 1, H, W)
    labels: Tensor  # (n,)
    masks: Tensor  # (n, H, W) bool
    boxes: Tensor  # (n, 4) int64, half-open (x0, y0, x1, y1)
    num_classes = 10
    classes = DIGIT_CLASSES
    return_annotations: bool

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, int] | dict:
        """``(image (1, H, W), label)``; with ``return_annotations=True`` a dict with keys ``input``, ``label``,
        ``index``, ``box`` (4,), ``box_mask`` (H, W) bool and ``stroke_mask`` (H, W) bool."""
        label = int(self.labels[index])
        if not self.return_annotations:
            return self.images[index], label
        h, w = self.images.shape[-2:]
        return {
            "input": self.images[index],
            "label": label,
            "index": int(index),
            "box": self.boxes[index],
            "box_mask": torch.from_numpy(box_mask(self.boxes[index].tolist(), h, w)),
            "stroke_mask": self.masks[index],
        }

    def box(self, index: int) -> tuple[int, int, int, int]:
        """Ground-truth half-open box ``(x0, y0, x1, y1)`` of the digit's strokes in pixels."""
        return tuple(int(v) for v in self.boxes[index])

    def stroke_mask(self, index: int) -> Tensor:
        """Boolean (H, W) mask of the (target) digit's strokes."""
        return self.masks[index]

    @property
    def input_size(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])


class DigitsDataset(_AnnotatedImages):
    """sklearn digits as (1, image_size, image_size) images in [0, 1], split deterministically by sample index.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"`` (60/20/20 % of a seeded permutation by default).
        image_size: side length after upsampling the 8×8 originals.
        interpolation: ``"bilinear"`` (smooth strokes, default) or ``"nearest"`` (blocky, exact 8×8 values).
        stroke_threshold: a pixel belongs to the stroke mask when its value exceeds this (values are in [0, 1]).
        seed, fractions: the split permutation and the (train, val, test) shares.
        return_annotations: return a dict with box and stroke mask instead of ``(image, label)``.
    """

    def __init__(
        self,
        split: str = "train",
        image_size: int = 32,
        interpolation: Interpolation = "bilinear",
        stroke_threshold: float = 0.5,
        seed: int = 0,
        fractions: Sequence[float] = DEFAULT_FRACTIONS,
        return_annotations: bool = False,
    ) -> None:
        if not 0.0 <= stroke_threshold < 1.0:
            raise ValueError(f"`stroke_threshold` must lie in [0, 1), got {stroke_threshold}.")
        images, labels = load_digit_images(image_size, interpolation)
        idx = torch.from_numpy(split_indices(len(labels), split, seed, fractions))
        self.split = split
        self.source_indices = idx
        self.images = images[idx].contiguous()
        self.labels = labels[idx].contiguous()
        self.masks = self.images[:, 0] > stroke_threshold
        self.boxes = torch.tensor([tight_box(m) for m in self.masks], dtype=torch.int64).reshape(-1, 4)
        self.return_annotations = return_annotations


class ClutteredDigitsDataset(_AnnotatedImages):
    """Real digits on a larger canvas among fragments of other digits; a deterministic localisation set.

    Each sample places one target digit (``digit_size``² after upsampling) at a random position of a black
    ``canvas_size``² canvas and adds ``num_distractors`` square fragments (``fragment_size``², cropped where
    they contain ink) of digits of *other* classes from the same split, outside the target's square. Pixels
    combine by maximum. The label is the target's class; :meth:`box` / :meth:`stroke_mask` locate the target.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``; the source digits are those of ``DigitsDataset(split)``.
        canvas_size, digit_size, fragment_size, num_distractors: geometry of the scene.
        samples_per_digit: scenes generated per source digit (different positions and distractors).
        stroke_threshold: ink threshold for the stroke mask (and for choosing fragments with ink).
        seed: drives both the split permutation and the scene layout; everything is reproducible.
        return_annotations: return a dict with box and stroke mask instead of ``(image, label)``.
    """

    def __init__(
        self,
        split: str = "train",
        canvas_size: int = 64,
        digit_size: int = 32,
        num_distractors: int = 3,
        fragment_size: int = 12,
        samples_per_digit: int = 1,
        stroke_threshold: float = 0.5,
        seed: int = 0,
        fractions: Sequence[float] = DEFAULT_FRACTIONS,
        return_annotations: bool = False,
    ) -> None:
        check_positive_int(samples_per_digit, "samples_per_digit")
        check_positive_int(num_distractors, "num_distractors", minimum=0)
        if not 8 <= digit_size <= canvas_size:
            raise ValueError(
                f"`digit_size` must lie in [8, canvas_size={canvas_size}], got {digit_size}; "
                "increase `canvas_size` or shrink the digit."
            )
        if not 1 <= fragment_size <= digit_size:
            raise ValueError(f"`fragment_size` must lie in [1, digit_size={digit_size}], got {fragment_size}.")
        source = DigitsDataset(split, digit_size, stroke_threshold=stroke_threshold, seed=seed, fractions=fractions)
        split_code = {"train": 0, "val": 1, "test": 2}[split]
        rng = np.random.RandomState([seed, split_code, canvas_size, digit_size, fragment_size])
        src_images = source.images[:, 0].numpy()
        src_labels = source.labels.numpy()
        n = len(source) * samples_per_digit
        canvas = np.zeros((n, canvas_size, canvas_size), dtype=np.float32)
        masks = np.zeros((n, canvas_size, canvas_size), dtype=bool)
        boxes = np.zeros((n, 4), dtype=np.int64)
        target_of = np.repeat(np.arange(len(source)), samples_per_digit)
        for i, t in enumerate(target_of):
            x, y = rng.randint(0, canvas_size - digit_size + 1, size=2)
            for _ in range(num_distractors):
                fragment = self._fragment(rng, src_images, src_labels, src_labels[t], fragment_size, stroke_threshold)
                pos = self._free_position(rng, canvas_size, fragment_size, (x, y, x + digit_size, y + digit_size))
                if pos is not None:
                    fx, fy = pos
                    window = canvas[i, fy : fy + fragment_size, fx : fx + fragment_size]
                    np.maximum(window, fragment, out=window)
            window = canvas[i, y : y + digit_size, x : x + digit_size]
            np.maximum(window, src_images[t], out=window)
            masks[i, y : y + digit_size, x : x + digit_size] = src_images[t] > stroke_threshold
            boxes[i] = source.boxes[t].numpy() + np.array([x, y, x, y])
        self.split = split
        self.source_indices = source.source_indices[torch.from_numpy(target_of)]
        self.images = torch.from_numpy(canvas).unsqueeze(1)
        self.labels = torch.from_numpy(src_labels[target_of].astype(np.int64))
        self.masks = torch.from_numpy(masks)
        self.boxes = torch.from_numpy(boxes)
        self.return_annotations = return_annotations

    @staticmethod
    def _fragment(rng, images, labels, target_label, size, threshold) -> np.ndarray:
        """A ``size``² crop with ink from a random digit of another class."""
        others = np.flatnonzero(labels != target_label)
        side = images.shape[-1]
        crop = np.zeros((size, size), dtype=np.float32)
        for _ in range(20):
            img = images[others[rng.randint(len(others))]]
            cx, cy = rng.randint(0, side - size + 1, size=2)
            crop = img[cy : cy + size, cx : cx + size]
            if (crop > threshold).mean() > 0.15:
                break
        return crop

    @staticmethod
    def _free_position(rng, canvas, size, target) -> tuple[int, int] | None:
        """Top-left corner of a ``size``² square not overlapping the target square; ``None`` if none found."""
        tx0, ty0, tx1, ty1 = target
        for _ in range(50):
            x, y = rng.randint(0, canvas - size + 1, size=2)
            if x + size <= tx0 or x >= tx1 or y + size <= ty0 or y >= ty1:
                return int(x), int(y)
        return None
