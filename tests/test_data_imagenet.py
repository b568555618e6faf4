"""ImageNet validation dataset on a generated ILSVRC-layout folder: labels, VOC boxes, attention maps, bad files."""

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms as T

from recalx_lightning.data import ImageNetValDataset, load_class_index, parse_voc_annotation

WNIDS = ["n01440764", "n01443537", "n01484850"]


def _xml(wnid: str, box: tuple[int, int, int, int]) -> str:
    xmin, ymin, xmax, ymax = box
    return (
        f"<annotation><filename>x</filename><size><width>60</width><height>40</height></size>"
        f"<object><name>{wnid}</name><bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin>"
        f"<xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object></annotation>"
    )


@pytest.fixture
def imagenet_dir(tmp_path):
    """4 JPEGs (60×40), 3 good XMLs + 1 malformed, a Keras class index and one attention map."""
    images, ann, att = tmp_path / "val", tmp_path / "ann", tmp_path / "att"
    for d in (images, ann, att):
        d.mkdir()
    rng = np.random.RandomState(0)
    for i in range(1, 5):
        pixels = rng.randint(0, 255, size=(40, 60, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"ILSVRC2012_val_{i:08d}.JPEG")
    # VOC corners are 1-based inclusive: (11, 6, 30, 25) is the half-open box (10, 5, 30, 25)
    (ann / "ILSVRC2012_val_00000001.xml").write_text(_xml(WNIDS[2], (11, 6, 30, 25)))
    (ann / "ILSVRC2012_val_00000002.xml").write_text(_xml(WNIDS[0], (1, 1, 60, 40)))
    (ann / "ILSVRC2012_val_00000003.xml").write_text(_xml(WNIDS[1], (5, 5, 9, 9)))
    (ann / "ILSVRC2012_val_00000004.xml").write_text("<annotation><object><name>n0144")  # truncated
    index = {str(k): [w, f"class {k}"] for k, w in enumerate(WNIDS)}
    (tmp_path / "class_index.json").write_text(json.dumps(index))
    np.save(att / "ILSVRC2012_val_00000001.npy", np.arange(40 * 60, dtype=np.float32).reshape(40, 60))
    return tmp_path


def test_class_index_formats(tmp_path, imagenet_dir):
    keras = load_class_index(imagenet_dir / "class_index.json")
    assert keras.wnids == tuple(WNIDS) and keras.names[1] == "class 1"
    txt = tmp_path / "LOC_synset_mapping.txt"
    txt.write_text("\n".join(f"{w} name {k}, other" for k, w in enumerate(WNIDS)))
    assert load_class_index(txt).wnids == tuple(WNIDS)
    assert load_class_index(txt).names[2] == "name 2, other"
    assert load_class_index({w: k for k, w in enumerate(reversed(WNIDS))}).wnids == tuple(reversed(WNIDS))
    with pytest.raises(ValueError, match="class_index"):
        load_class_index(tmp_path / "missing.json")


def test_parse_voc_converts_to_half_open(imagenet_dir):
    objects = parse_voc_annotation(imagenet_dir / "ann" / "ILSVRC2012_val_00000001.xml")
    assert objects == [(WNIDS[2], (10, 5, 30, 25))]
    with pytest.raises(ValueError, match="cannot parse"):
        parse_voc_annotation(imagenet_dir / "ann" / "ILSVRC2012_val_00000004.xml")


def test_flat_layout_labels_from_xml_and_malformed_counted(imagenet_dir, caplog):
    with caplog.at_level(logging.WARNING):
        ds = ImageNetValDataset(imagenet_dir / "val", imagenet_dir / "class_index.json", imagenet_dir / "ann")
    assert len(ds) == 3  # image 4 has only a malformed annotation, hence no label
    assert ds.stats.malformed_boxes == 1 and ds.stats.boxes == 3 and ds.stats.unlabelled == 1
    assert "malformed" in caplog.text
    assert ds.labels.tolist() == [2, 0, 1]
    x, y = ds[0]
    assert x.shape == (3, 40, 60) and y == 2 and float(x.min()) >= 0 and float(x.max()) <= 1


def test_box_mask_follows_resize_and_center_crop(imagenet_dir):
    # 60×40 → Resize(32) → 48×32 (scale 0.8) → CenterCrop(32) drops 8 columns on the left
    transform = T.Compose([T.Resize(32), T.CenterCrop(32), T.ToTensor()])
    ds = ImageNetValDataset(
        imagenet_dir / "val",
        imagenet_dir / "class_index.json",
        imagenet_dir / "ann",
        attention_dir=imagenet_dir / "att",
        transform=transform,
        return_annotations=True,
    )
    item = ds[0]
    assert item["input"].shape == (3, 32, 32) and item["has_box"] and item["has_attention"]
    expected = torch.zeros(32, 32, dtype=torch.bool)
    expected[4:20, 0:16] = True  # box (10, 5, 30, 25) · 0.8 − (8, 0, 8, 0)
    assert (item["box_mask"] ^ expected).sum() <= 8  # at most a one-pixel seam from nearest resizing
    assert item["box_mask"][6:18, 1:14].all()
    att = item["attention"]  # values grow along rows then columns: value = 60 r + c in the original
    assert att.shape == (32, 32)
    assert float(att[0, 0]) < float(att[0, 31]) < float(att[31, 0])
    batch = next(iter(DataLoader(ds, batch_size=3)))
    assert batch["has_attention"].tolist() == [True, False, False]
    assert batch["attention"][1].abs().sum() == 0


def test_folder_layout_and_labels_file(tmp_path, imagenet_dir):
    root = tmp_path / "folders"
    for k, w in enumerate(WNIDS):
        (root / w).mkdir(parents=True)
        Image.new("RGB", (20, 10), (k * 50, 0, 0)).save(root / w / f"img{k}.JPEG")
    ds = ImageNetValDataset(root, WNIDS)
    assert sorted(ds.labels.tolist()) == [0, 1, 2]
    labels = tmp_path / "labels.txt"
    labels.write_text("ILSVRC2012_val_00000001.JPEG n01443537\nILSVRC2012_val_00000002.JPEG 2\n")
    flat = ImageNetValDataset(imagenet_dir / "val", WNIDS, labels=labels)
    assert flat.labels.tolist() == [1, 2] and flat.stats.unlabelled == 2


def test_unreadable_image_skipped_with_warning(imagenet_dir):
    (imagenet_dir / "val" / "ILSVRC2012_val_00000009.JPEG").write_bytes(b"not a jpeg at all")
    with pytest.warns(UserWarning, match="unreadable"):
        ds = ImageNetValDataset(imagenet_dir / "val", imagenet_dir / "class_index.json", imagenet_dir / "ann")
    assert ds.stats.unreadable_images == 1 and len(ds) == 3


def test_bad_folders(tmp_path, imagenet_dir):
    with pytest.raises(ValueError, match="not a directory"):
        ImageNetValDataset(tmp_path / "nope", WNIDS)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        ImageNetValDataset(tmp_path / "empty", WNIDS)
    with pytest.raises(ValueError, match="annotations_dir"):
        ImageNetValDataset(imagenet_dir / "val", WNIDS, annotations_dir=tmp_path / "nope")
    with pytest.raises(ValueError, match="has a label"):
        ImageNetValDataset(imagenet_dir / "val", WNIDS)


def test_image_failing_to_decode_is_replaced_by_next(imagenet_dir):
    path = imagenet_dir / "val" / "ILSVRC2012_val_00000001.JPEG"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])  # header intact, pixel data truncated
    ds = ImageNetValDataset(imagenet_dir / "val", imagenet_dir / "class_index.json", imagenet_dir / "ann")
    assert len(ds) == 3
    with pytest.warns(UserWarning, match="unreadable"):
        x, y = ds[0]
    assert y == ds.labels[1] and ds.stats.unreadable_images == 1


# ------------------------------------------------------------------------------- devkit and LOC layouts
def _flat_images(folder, count: int, size=(60, 40)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(1)
    for i in range(1, count + 1):
        Image.fromarray(rng.randint(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)).save(
            folder / f"ILSVRC2012_val_{i:08d}.JPEG")


def _meta_mat(path, leaf_wnids_by_id):
    """A devkit-like meta.mat: leaf synsets (num_children 0) with their ILSVRC2012_IDs, plus one inner synset."""
    from scipy.io import savemat

    dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")]
    rows = [(k, w, f"words {w}", 0) for k, w in leaf_wnids_by_id.items()]
    rows.append((len(rows) + 1, "n00001740", "entity", 3))
    savemat(path, {"synsets": np.array(rows, dtype=dtype)})


def test_devkit_ground_truth_maps_ilsvrc_ids_through_wnids(tmp_path):
    # ILSVRC2012_IDs order the synsets differently from the classifier's (sorted) class index
    ilsvrc_order = {1: WNIDS[2], 2: WNIDS[0], 3: WNIDS[1]}
    devkit = tmp_path / "ILSVRC2012_devkit_t12"
    (devkit / "data").mkdir(parents=True)
    _meta_mat(devkit / "data" / "meta.mat", ilsvrc_order)
    (devkit / "data" / "ILSVRC2012_validation_ground_truth.txt").write_text("1\n2\n3\n1\n")
    _flat_images(tmp_path / "val", 4)
    ds = ImageNetValDataset(tmp_path / "val", WNIDS, devkit=devkit)
    assert ds.labels.tolist() == [2, 0, 1, 2]
    text = tmp_path / "synsets.txt"  # the same table as a text file of wnids in id order
    text.write_text("\n".join(ilsvrc_order[k] for k in (1, 2, 3)))
    same = ImageNetValDataset(tmp_path / "val", WNIDS, ground_truth=devkit / "data" /
                              "ILSVRC2012_validation_ground_truth.txt", ilsvrc_synsets=text)
    assert same.labels.tolist() == [2, 0, 1, 2]
    with pytest.raises(ValueError, match="needs `ilsvrc_synsets`"):
        ImageNetValDataset(tmp_path / "val", WNIDS, ground_truth=devkit / "data" /
                           "ILSVRC2012_validation_ground_truth.txt")
    (devkit / "data" / "ILSVRC2012_validation_ground_truth.txt").write_text("1\n7\n")
    with pytest.raises(ValueError, match="line 2 holds ILSVRC2012_ID 7"):
        ImageNetValDataset(tmp_path / "val", WNIDS, devkit=devkit)


def test_loc_solution_csv_gives_labels_and_boxes(tmp_path):
    _flat_images(tmp_path / "val", 4)
    mapping = tmp_path / "LOC_synset_mapping.txt"
    mapping.write_text("\n".join(f"{w} class {k}" for k, w in enumerate(WNIDS)))
    csv = tmp_path / "LOC_val_solution.csv"
    csv.write_text(
        "ImageId,PredictionString\n"
        f"ILSVRC2012_val_00000002,{WNIDS[1]} 11 6 30 25 {WNIDS[1]} 1 1 5 5 \n"
        f"ILSVRC2012_val_00000001,{WNIDS[2]} 1 1 60 40\n"
        f"ILSVRC2012_val_00000003,{WNIDS[0]} 1 1 x 5\n"  # malformed: skipped, counted
    )
    ds = ImageNetValDataset(tmp_path / "val", mapping, loc_solution=csv, return_annotations=True)
    assert ds.labels.tolist() == [2, 1]  # image 3 malformed, image 4 absent: no label
    assert ds.stats.boxes == 2 and ds.stats.malformed_boxes == 1 and ds.stats.missing_boxes == 1
    assert ds.boxes[1] == [(10, 5, 30, 25), (0, 0, 5, 5)]  # same conversion as the XML files
    item = ds[1]
    expected = torch.zeros(40, 60, dtype=torch.bool)
    expected[5:25, 10:30] = True
    expected[0:5, 0:5] = True
    assert torch.equal(item["box_mask"], expected) and item["label"] == 1
    bad = tmp_path / "bad.csv"
    bad.write_text("id,label\n")
    with pytest.raises(ValueError, match="not LOC_val_solution.csv"):
        ImageNetValDataset(tmp_path / "val", mapping, loc_solution=bad)
    with pytest.raises(ValueError, match="not both"):
        ImageNetValDataset(tmp_path / "val", mapping, loc_solution=csv, annotations_dir=tmp_path)
