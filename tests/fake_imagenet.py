"""A small fake ILSVRC2012 validation set in every layout the ImageNet dataset reads, for tests and smoke runs.

    python -m tests.fake_imagenet OUT [--images 40] [--classes 1000] [--size 96 72]

writes, under OUT:

* ``val/ILSVRC2012_val_%08d.JPEG`` (flat) and ``val_folders/<wnid>/...`` (class folders, the same images);
* ``val_xml/<stem>.xml`` (PASCAL VOC boxes), ``LOC_val_solution.csv`` and ``LOC_synset_mapping.txt``;
* ``ILSVRC2012_devkit_t12/data/{ILSVRC2012_validation_ground_truth.txt, meta.mat}`` whose ILSVRC2012_IDs order
  the synsets differently from the sorted wnids (as the real devkit does).

Each image is noise with one bright object rectangle (its box); labels cycle over the first classes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def fake_wnids(count: int) -> list[str]:
    """``count`` distinct, sorted synset-like ids (``n00000100``, ...)."""
    return [f"n{100 + 7 * k:08d}" for k in range(count)]


def _voc(wnid: str, box: tuple[int, int, int, int], size: tuple[int, int]) -> str:
    xmin, ymin, xmax, ymax = box
    return (
        f"<annotation><size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>"
        f"<object><name>{wnid}</name><bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin><xmax>{xmax}</xmax>"
        f"<ymax>{ymax}</ymax></bndbox></object></annotation>"
    )


def build_fake_imagenet(
    out: str | Path, num_images: int = 40, num_classes: int = 1000, labelled_classes: int = 4,
    size: tuple[int, int] = (96, 72), seed: int = 0,
) -> dict[str, Path]:
    """Write the fake dataset (see the module docstring); returns the paths a config needs."""
    from scipy.io import savemat

    out = Path(out)
    rng = np.random.RandomState(seed)
    wnids = fake_wnids(num_classes)
    paths = {
        "root": out / "val", "folders": out / "val_folders", "annotations_dir": out / "val_xml",
        "class_index": out / "LOC_synset_mapping.txt", "loc_solution": out / "LOC_val_solution.csv",
        "devkit": out / "ILSVRC2012_devkit_t12",
    }
    for key in ("root", "folders", "annotations_dir"):
        paths[key].mkdir(parents=True, exist_ok=True)
    (paths["devkit"] / "data").mkdir(parents=True, exist_ok=True)
    paths["class_index"].write_text("".join(f"{w} fake class {k}, synonym\n" for k, w in enumerate(wnids)))
    ilsvrc_order = list(reversed(wnids))  # ILSVRC2012_ID k + 1 → ilsvrc_order[k]
    id_of = {w: k + 1 for k, w in enumerate(ilsvrc_order)}
    width, height = size
    csv_rows, truth = ["ImageId,PredictionString"], []
    for i in range(1, num_images + 1):
        stem = f"ILSVRC2012_val_{i:08d}"
        wnid = wnids[(i - 1) % labelled_classes]
        pixels = rng.randint(0, 90, size=(height, width, 3)).astype(np.uint8)
        x0, y0 = rng.randint(0, width // 2), rng.randint(0, height // 2)
        x1, y1 = x0 + rng.randint(width // 4, width // 2), y0 + rng.randint(height // 4, height // 2)
        pixels[y0:y1, x0:x1] = rng.randint(150, 255, size=3)
        image = Image.fromarray(pixels)
        image.save(paths["root"] / f"{stem}.JPEG", quality=90)
        (paths["folders"] / wnid).mkdir(exist_ok=True)
        image.save(paths["folders"] / wnid / f"{stem}.JPEG", quality=90)
        box = (x0 + 1, y0 + 1, x1, y1)  # VOC: 1-based inclusive corners
        (paths["annotations_dir"] / f"{stem}.xml").write_text(_voc(wnid, box, size))
        csv_rows.append(f"{stem},{wnid} {' '.join(map(str, box))}")
        truth.append(str(id_of[wnid]))
    paths["loc_solution"].write_text("\n".join(csv_rows) + "\n")
    (paths["devkit"] / "data" / "ILSVRC2012_validation_ground_truth.txt").write_text("\n".join(truth) + "\n")
    dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")]
    synsets = [(k + 1, w, f"fake {w}", 0) for k, w in enumerate(ilsvrc_order)]
    synsets.append((num_classes + 1, "n99999999", "inner synset", 2))
    savemat(paths["devkit"] / "data" / "meta.mat", {"synsets": np.array(synsets, dtype=dtype)})
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--size", type=int, nargs=2, default=(96, 72), metavar=("WIDTH", "HEIGHT"))
    args = parser.parse_args()
    for key, path in build_fake_imagenet(args.out, args.images, args.classes, size=tuple(args.size)).items():
        print(f"{key}: {path}")


if __name__ == "__main__":
    main()
