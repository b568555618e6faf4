"""ImageNet (ILSVRC2012) validation images with class index, bounding boxes and optional human attention maps.

Layouts understood for ``root``:

* class folders ``root/<wnid>/*.JPEG`` (torchvision ``ImageFolder`` style): the label is the folder's class;
* flat ``root/ILSVRC2012_val_00000001.JPEG`` with the devkit's ground truth: ``ground_truth`` =
  ``ILSVRC2012_validation_ground_truth.txt`` (line i: the ILSVRC2012_ID, 1…1000, of image i) and
  ``ilsvrc_synsets`` = the devkit's ``data/meta.mat`` (or a text file of the 1,000 wnids in ILSVRC2012_ID order),
  which maps those ids to wnids; ``devkit`` = the devkit folder sets both. ILSVRC ids are *not* the class order
  of classifiers (sorted wnids): labels always go through the wnid and ``class_index``;
* flat, with Kaggle's ``LOC_val_solution.csv`` (``loc_solution``): labels *and* boxes from its
  ``PredictionString`` (``wnid x_min y_min x_max y_max`` per object); ``class_index`` =
  ``LOC_synset_mapping.txt``;
* flat, otherwise: the label comes from ``labels`` (a mapping or a text file of ``<file name> <wnid or index>``
  lines) or else from the first object of the image's XML annotation.

Boxes come from the official per-image PASCAL VOC XML files (``annotations_dir/<image stem>.xml``) or from
``LOC_val_solution.csv`` (the same corners), converted from VOC's 1-based inclusive corners to 0-based
half-open pixel boxes ``(x0, y0, x1, y1)``. Attention maps are
per-image files in ``attention_dir`` with the image's stem (``.npy``, ``.pt`` or a grayscale image).
Malformed or missing annotations are skipped and counted (``self.stats``, logged once), never raised mid-run.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from recalx_lightning._boxes import boxes_to_masks

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp")
_ATTENTION_EXTENSIONS = (".npy", ".pt", ".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class ClassIndex:
    """The class order of a classifier: ``wnids[k]`` / ``names[k]`` belong to logit k."""

    wnids: tuple[str, ...]
    names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.wnids)

    @property
    def index(self) -> dict[str, int]:
        return {w: k for k, w in enumerate(self.wnids)}


def load_class_index(source: str | os.PathLike | Sequence[str] | Mapping | ClassIndex) -> ClassIndex:
    """Read a class index from a JSON file, a text file, a list of wnids or a mapping.

    Accepted: Keras-style JSON ``{"0": ["n01440764", "tench"], ...}``; JSON list of wnids; JSON/dict
    ``{wnid: index}``; text ``LOC_synset_mapping.txt`` (``n01440764 tench, Tinca tinca`` per line, in class
    order) or one wnid per line.
    """
    if isinstance(source, ClassIndex):
        return source
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"`class_index` file {str(path)!r} does not exist; pass a JSON or text class map.")
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".json":
            source = json.loads(text)
        else:
            lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
            parts = [ln.split(maxsplit=1) for ln in lines]
            return ClassIndex(tuple(p[0] for p in parts), tuple(p[1] if len(p) > 1 else p[0] for p in parts))
    if isinstance(source, Mapping):
        items = list(source.items())
        if items and isinstance(items[0][1], (list, tuple)):  # {"0": [wnid, name]}
            ordered = sorted(items, key=lambda kv: int(kv[0]))
            return ClassIndex(tuple(v[0] for _, v in ordered), tuple(v[1] for _, v in ordered))
        ordered = sorted(items, key=lambda kv: int(kv[1]))  # {wnid: index}
        return ClassIndex(tuple(k for k, _ in ordered), tuple(k for k, _ in ordered))
    if isinstance(source, Sequence) and all(isinstance(s, str) for s in source):
        return ClassIndex(tuple(source), tuple(source))
    raise ValueError(
        "`class_index` must be a JSON/text file, a list of wnids, a {wnid: index} mapping or a Keras-style "
        f"{{'0': [wnid, name]}} mapping; got {type(source).__name__}."
    )


def parse_voc_annotation(path: str | os.PathLike) -> list[tuple[str, tuple[int, int, int, int]]]:
    """Objects ``[(wnid, (x0, y0, x1, y1)), ...]`` of a PASCAL VOC XML file, boxes 0-based half-open.

    Raises ``ValueError`` when the file is not parseable or an object lacks a valid box.
    """
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as err:
        raise ValueError(f"cannot parse annotation {str(path)!r}: {err}") from err
    objects = []
    for obj in root.iter("object"):
        name, bndbox = obj.findtext("name"), obj.find("bndbox")
        if not name or bndbox is None:
            raise ValueError(f"annotation {str(path)!r} has an <object> without <name> or <bndbox>.")
        try:
            xmin, ymin, xmax, ymax = (float(bndbox.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        except (TypeError, ValueError) as err:
            raise ValueError(f"annotation {str(path)!r} has a non-numeric or missing box corner.") from err
        if xmax < xmin or ymax < ymin:
            raise ValueError(f"annotation {str(path)!r} has an inverted box {xmin, ymin, xmax, ymax}.")
        objects.append((name.strip(), (int(xmin) - 1, int(ymin) - 1, int(xmax), int(ymax))))
    if not objects:
        raise ValueError(f"annotation {str(path)!r} contains no <object>.")
    return objects


def read_loc_solution(path: str | os.PathLike) -> dict[str, list[tuple[str, tuple[int, int, int, int]]]]:
    """Objects per image stem from Kaggle's ``LOC_val_solution.csv`` (``ImageId,PredictionString``), boxes
    converted like the XML files' (0-based half-open). A row that does not parse maps to ``[]`` (the dataset
    counts it in ``stats.malformed_boxes``)."""
    import csv

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"`loc_solution` {str(path)!r} does not exist; point it at LOC_val_solution.csv.")
    out: dict[str, list] = {}
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:2]] != ["ImageId", "PredictionString"]:
            raise ValueError(f"`loc_solution` {str(path)!r} is not LOC_val_solution.csv (expected the header "
                             f"'ImageId,PredictionString', got {header}).")
        for row in reader:
            if len(row) < 2:
                continue
            parts = row[1].split()
            objects = []
            try:
                for k in range(0, len(parts) - 4, 5):
                    xmin, ymin, xmax, ymax = (float(v) for v in parts[k + 1 : k + 5])
                    if xmax < xmin or ymax < ymin:
                        raise ValueError("inverted box")
                    objects.append((parts[k], (int(xmin) - 1, int(ymin) - 1, int(xmax), int(ymax))))
            except ValueError:
                objects = []
            out[Path(row[0].strip()).stem] = objects if len(parts) % 5 == 0 else []
    return out


def read_devkit_labels(ground_truth: str | os.PathLike, ilsvrc_synsets: str | os.PathLike) -> dict[str, str]:
    """``{image stem: wnid}`` from the devkit's ``ILSVRC2012_validation_ground_truth.txt`` (ILSVRC2012_IDs, one
    line per image in file-name order) and the id → wnid table (``meta.mat`` or a text file of wnids)."""
    truth = Path(ground_truth)
    if not truth.is_file():
        raise ValueError(f"`ground_truth` {str(truth)!r} does not exist; point it at the devkit's "
                         "data/ILSVRC2012_validation_ground_truth.txt.")
    synsets = ilsvrc_id_to_wnid(ilsvrc_synsets)
    labels = {}
    for line_number, line in enumerate(truth.read_text(encoding="utf-8").split(), start=1):
        ilsvrc_id = int(line)
        if ilsvrc_id not in synsets:
            raise ValueError(f"`ground_truth` line {line_number} holds ILSVRC2012_ID {ilsvrc_id}, which "
                             f"`ilsvrc_synsets` does not list ({len(synsets)} ids); use the same devkit's meta.mat.")
        labels[f"ILSVRC2012_val_{line_number:08d}"] = synsets[ilsvrc_id]
    return labels


def ilsvrc_id_to_wnid(source: str | os.PathLike) -> dict[int, str]:
    """``{ILSVRC2012_ID: wnid}`` of the 1,000 leaf synsets, from the devkit's ``meta.mat`` or a text file with
    one wnid per line in ILSVRC2012_ID order (line 1 = id 1)."""
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"`ilsvrc_synsets` {str(path)!r} does not exist; point it at the devkit's data/meta.mat.")
    if path.suffix.lower() == ".mat":
        from scipy.io import loadmat

        synsets = loadmat(str(path), squeeze_me=True)["synsets"]
        names = synsets.dtype.names or ()
        if not {"ILSVRC2012_ID", "WNID"} <= set(names):
            raise ValueError(f"{str(path)!r} has no synsets with ILSVRC2012_ID and WNID; is it the devkit's meta.mat?")
        leaves = [s for s in synsets if "num_children" not in names or int(s["num_children"]) == 0]
        return {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in leaves}
    wnids = [ln.split()[0] for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    return {k: w for k, w in enumerate(wnids, start=1)}


def _geometry(transform: Callable | None, interpolation: str) -> Callable[[Tensor], Tensor] | None:
    """The resize/crop steps of a torchvision ``Compose`` (timm, open_clip) re-made for masks (1, H, W)."""
    from torchvision import transforms as T

    if transform is None or not isinstance(transform, T.Compose):
        return None
    mode = T.InterpolationMode.NEAREST if interpolation == "nearest" else T.InterpolationMode.BILINEAR
    steps: list[Callable] = []
    for t in transform.transforms:
        if isinstance(t, T.Resize):
            steps.append(T.Resize(t.size, interpolation=mode, max_size=t.max_size, antialias=False))
        elif isinstance(t, T.CenterCrop):
            steps.append(T.CenterCrop(t.size))
    return T.Compose(steps)


@dataclass
class AnnotationStats:
    """Counts of what was found and skipped while indexing the folder."""

    images: int = 0
    unlabelled: int = 0
    boxes: int = 0
    missing_boxes: int = 0
    malformed_boxes: int = 0
    attention: int = 0
    unreadable_images: int = 0
    skipped_files: list[str] = field(default_factory=list)


class ImageNetValDataset(Dataset):
    """ILSVRC2012 validation images → ``(transform(image), label)``; annotations on request.

    Args:
        root: image folder (class sub-folders or flat, see module doc).
        class_index: the classifier's class order (see :func:`load_class_index`).
        annotations_dir: folder of per-image VOC XML files (optional); boxes of all objects are kept.
        attention_dir: folder of per-image human attention maps (optional).
        transform: PIL image → tensor (C, H, W), e.g. ``timm.data.create_transform(**data_config)``. Its
            resize/center-crop steps are re-applied to box masks and attention maps so they align with the
            input. ``None``: ``ToTensor`` at the original size.
        labels: flat layout only: mapping file name/stem → wnid or index, or a text file of such lines.
        ground_truth, ilsvrc_synsets: flat layout with the devkit: ``ILSVRC2012_validation_ground_truth.txt``
            and ``meta.mat`` (or a text file of wnids in ILSVRC2012_ID order).
        devkit: the devkit folder (``ILSVRC2012_devkit_t12``); sets ``ground_truth`` and ``ilsvrc_synsets``
            from its ``data/`` folder.
        loc_solution: ``LOC_val_solution.csv``: labels and boxes (instead of ``annotations_dir``).
        mask_transform: override for the geometry applied to masks (1, H, W) → (1, H', W').
        return_annotations: ``__getitem__`` returns a dict with ``input``, ``label``, ``index``, ``box_mask``
            (H', W') bool (union of all object boxes), ``has_box``, ``attention`` (H', W') float (zeros when
            absent) and ``has_attention``.
        check_images: open every image header at construction and skip unreadable files (warned, counted).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        class_index: str | os.PathLike | Sequence[str] | Mapping | ClassIndex,
        annotations_dir: str | os.PathLike | None = None,
        attention_dir: str | os.PathLike | None = None,
        transform: Callable | None = None,
        labels: str | os.PathLike | Mapping | None = None,
        mask_transform: Callable[[Tensor], Tensor] | None = None,
        return_annotations: bool = False,
        check_images: bool = True,
        ground_truth: str | os.PathLike | None = None,
        ilsvrc_synsets: str | os.PathLike | None = None,
        devkit: str | os.PathLike | None = None,
        loc_solution: str | os.PathLike | None = None,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"`root` {str(self.root)!r} is not a directory; point it at the validation images.")
        for arg, value in (("annotations_dir", annotations_dir), ("attention_dir", attention_dir)):
            if value is not None and not Path(value).is_dir():
                raise ValueError(f"`{arg}` {str(value)!r} is not a directory; pass an existing folder or None.")
        self.class_index = load_class_index(class_index)
        self.num_classes = len(self.class_index)
        self.transform = transform
        self.return_annotations = return_annotations
        self.stats = AnnotationStats()
        files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not files:
            raise ValueError(
                f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under `root` {str(self.root)!r}; "
                "is this the ILSVRC2012 validation folder?"
            )
        if devkit is not None:
            if not Path(devkit).is_dir():
                raise ValueError(f"`devkit` {str(devkit)!r} is not a directory; point it at ILSVRC2012_devkit_t12.")
            ground_truth = ground_truth or Path(devkit) / "data" / "ILSVRC2012_validation_ground_truth.txt"
            ilsvrc_synsets = ilsvrc_synsets or Path(devkit) / "data" / "meta.mat"
        if (ground_truth is None) != (ilsvrc_synsets is None):
            raise ValueError("`ground_truth` needs `ilsvrc_synsets` (the devkit's meta.mat: ILSVRC ids are not the "
                             "classifier's class order) and vice versa; or pass `devkit`.")
        given = [name for name, value in (("labels", labels), ("ground_truth", ground_truth),
                                          ("loc_solution", loc_solution)) if value is not None]
        if len(given) > 1:
            raise ValueError(f"pass one label source, got {given}.")
        if loc_solution is not None and annotations_dir is not None:
            raise ValueError("pass boxes either as `annotations_dir` (XML files) or `loc_solution` (CSV), not both.")
        boxes = self._read_boxes(files, Path(annotations_dir)) if annotations_dir is not None else {}
        label_map = self._read_labels(labels) if labels is not None else None
        if ground_truth is not None:
            label_map = read_devkit_labels(ground_truth, ilsvrc_synsets)
        if loc_solution is not None:
            boxes = self._csv_boxes(files, read_loc_solution(loc_solution))
            label_map = {stem: objects[0][0] for stem, objects in boxes.items()}
        if check_images:
            files = [f for f in files if self._readable(f)]
        self.samples: list[tuple[Path, int]] = []
        self.boxes: list[list[tuple[int, int, int, int]]] = []
        wnid_to_idx = self.class_index.index
        for f in files:
            label = self._label(f, label_map, boxes.get(f.stem), wnid_to_idx)
            if label is None:
                self.stats.unlabelled += 1
                continue
            self.samples.append((f, label))
            self.boxes.append([b for _, b in boxes.get(f.stem, [])])
        if not self.samples:
            raise ValueError(
                f"none of the {len(files)} images under {str(self.root)!r} has a label: use class sub-folders "
                "named by wnid, pass `labels`, or pass `annotations_dir` with the XML files."
            )
        self.attention_files = self._index_attention(Path(attention_dir)) if attention_dir is not None else {}
        self.stats.images = len(self.samples)
        self.stats.attention = sum(f.stem in self.attention_files for f, _ in self.samples)
        self._box_geometry = mask_transform or _geometry(transform, "nearest")
        self._attention_geometry = mask_transform or _geometry(transform, "bilinear")
        log.info("ImageNetValDataset(%s): %s", self.root, self.stats)

    # ---------------------------------------------------------------------------------------- indexing
    def _read_boxes(self, files: list[Path], folder: Path) -> dict[str, list]:
        boxes = {}
        for f in files:
            xml = folder / f"{f.stem}.xml"
            if not xml.is_file():
                self.stats.missing_boxes += 1
                continue
            try:
                boxes[f.stem] = parse_voc_annotation(xml)
                self.stats.boxes += 1
            except ValueError as err:
                self.stats.malformed_boxes += 1
                self.stats.skipped_files.append(str(xml))
                log.debug("skipping annotation: %s", err)
        if self.stats.malformed_boxes or self.stats.missing_boxes:
            log.warning(
                "ImageNet boxes: %d loaded, %d missing, %d malformed (skipped).",
                self.stats.boxes,
                self.stats.missing_boxes,
                self.stats.malformed_boxes,
            )
        return boxes

    def _csv_boxes(self, files: list[Path], solution: dict[str, list]) -> dict[str, list]:
        boxes = {}
        for f in files:
            objects = solution.get(f.stem)
            if objects is None:
                self.stats.missing_boxes += 1
            elif not objects:
                self.stats.malformed_boxes += 1
            else:
                boxes[f.stem] = objects
                self.stats.boxes += 1
        if self.stats.malformed_boxes or self.stats.missing_boxes:
            log.warning("ImageNet boxes (LOC_val_solution.csv): %d loaded, %d missing, %d malformed (skipped).",
                        self.stats.boxes, self.stats.missing_boxes, self.stats.malformed_boxes)
        return boxes

    @staticmethod
    def _read_labels(labels: str | os.PathLike | Mapping) -> dict[str, str]:
        if isinstance(labels, Mapping):
            return {Path(str(k)).stem: str(v) for k, v in labels.items()}
        path = Path(labels)
        if not path.is_file():
            raise ValueError(f"`labels` file {str(path)!r} does not exist.")
        out = {}
        for line in path.read_text(encoding="utf-8").splitlines():
            parts = line.replace(",", " ").split()
            if len(parts) >= 2:
                out[Path(parts[0]).stem] = parts[1]
        return out

    def _label(self, f: Path, label_map, objects, wnid_to_idx) -> int | None:
        if f.parent != self.root and f.parent.name in wnid_to_idx:
            return wnid_to_idx[f.parent.name]
        if label_map is not None and f.stem in label_map:
            value = label_map[f.stem]
            if value in wnid_to_idx:
                return wnid_to_idx[value]
            if value.isdigit() and int(value) < self.num_classes:
                return int(value)
            return None
        if objects:
            return wnid_to_idx.get(objects[0][0])
        return None

    def _readable(self, f: Path) -> bool:
        from PIL import Image

        try:
            with Image.open(f) as im:
                im.size  # noqa: B018 - reading the header is the check
            return True
        except Exception as err:  # PIL raises many types for broken files
            self.stats.unreadable_images += 1
            self.stats.skipped_files.append(str(f))
            warnings.warn(f"skipping unreadable image {str(f)!r}: {err}", UserWarning, stacklevel=3)
            return False

    @staticmethod
    def _index_attention(folder: Path) -> dict[str, Path]:
        return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in _ATTENTION_EXTENSIONS}

    # ---------------------------------------------------------------------------------------- access
    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> Tensor:
        return torch.tensor([label for _, label in self.samples], dtype=torch.int64)

    def _load(self, index: int):
        from PIL import Image

        with Image.open(self.samples[index][0]) as im:
            return im.convert("RGB")

    def __getitem__(self, index: int) -> tuple[Tensor, int] | dict:
        """``(image, label)``; an image that fails to decode is replaced by the next readable one (warned,
        counted in ``stats.unreadable_images``)."""
        for offset in range(len(self)):
            i = (index + offset) % len(self)
            try:
                image = self._load(i)
                break
            except OSError as err:
                self.stats.unreadable_images += 1
                warnings.warn(f"skipping unreadable image {str(self.samples[i][0])!r}: {err}", UserWarning, 2)
        else:
            raise RuntimeError("no image of the dataset could be decoded.")
        x = self.transform(image) if self.transform is not None else _to_tensor(image)
        label = self.samples[i][1]
        if not self.return_annotations:
            return x, label
        size = tuple(x.shape[-2:])
        box = self.box_mask(i, image.size[::-1])
        att = self.attention(i, image.size[::-1])
        return {
            "input": x,
            "label": label,
            "index": int(i),
            "box_mask": _fit(box, self._box_geometry, size, "nearest") > 0.5 if box is not None else _empty(size),
            "has_box": box is not None,
            "attention": _fit(att, self._attention_geometry, size, "bilinear") if att is not None else _zeros(size),
            "has_attention": att is not None,
        }

    def box_mask(self, index: int, image_hw: tuple[int, int] | None = None) -> Tensor | None:
        """Union of the object boxes as a float (H, W) mask at the original image size; ``None`` if no box."""
        if not self.boxes[index]:
            return None
        if image_hw is None:
            image_hw = self._load(index).size[::-1]
        return boxes_to_masks(torch.tensor(self.boxes[index]), tuple(image_hw)).any(0).float()

    def attention(self, index: int, image_hw: tuple[int, int] | None = None) -> Tensor | None:
        """The human attention map (H, W) float, resized to the original image size; ``None`` if absent."""
        path = self.attention_files.get(self.samples[index][0].stem)
        if path is None:
            return None
        if path.suffix == ".npy":
            att = torch.from_numpy(np.load(path).astype(np.float32))
        elif path.suffix == ".pt":
            from recalx_lightning.checkpoints import read_weights_only

            att = read_weights_only(path, "attention map").float()
        else:
            from PIL import Image

            with Image.open(path) as im:
                att = torch.from_numpy(np.asarray(im.convert("L"), dtype=np.float32) / 255.0)
        att = att.squeeze()
        if att.ndim != 2:
            warnings.warn(f"attention map {str(path)!r} is not 2-D (shape {tuple(att.shape)}); ignored.", stacklevel=2)
            return None
        if image_hw is not None and tuple(att.shape) != tuple(image_hw):
            att = F.interpolate(att[None, None], size=tuple(image_hw), mode="bilinear", align_corners=False)[0, 0]
        return att


def _to_tensor(image) -> Tensor:
    arr = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def _fit(mask: Tensor, geometry, size: tuple[int, int], mode: str) -> Tensor:
    """Apply the transform's geometry to a (H, W) mask and make sure it has the input's spatial size."""
    out = mask[None]
    if geometry is not None:
        out = geometry(out)
    if tuple(out.shape[-2:]) != tuple(size):
        kwargs = {"align_corners": False} if mode == "bilinear" else {}
        out = F.interpolate(out[None], size=size, mode=mode, **kwargs)[0]
    return out[0]


def _empty(size) -> Tensor:
    return torch.zeros(size, dtype=torch.bool)


def _zeros(size) -> Tensor:
    return torch.zeros(size)
