"""Embedded digits, cluttered digits and tabular data: splits, pixel values, masks and boxes against numpy oracles."""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.feature_selection import f_classif
from sklearn.neighbors import KNeighborsClassifier
from torch.utils.data import DataLoader

from recalx_lightning.data import (
    ClutteredDigitsDataset,
    DigitsDataset,
    TabularDataset,
    make_dataset,
    split_indices,
)


@pytest.fixture(scope="module")
def sk_digits():
    return load_digits()


def test_split_indices_partition_and_determinism():
    parts = [split_indices(100, s, seed=3) for s in ("train", "val", "test")]
    assert [len(p) for p in parts] == [60, 20, 20]
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(100))
    assert np.array_equal(parts[0], split_indices(100, "train", seed=3))
    assert not np.array_equal(parts[0], split_indices(100, "train", seed=4))
    with pytest.raises(ValueError, match="split"):
        split_indices(100, "validation")
    with pytest.raises(ValueError, match="fractions"):
        split_indices(100, "train", fractions=(0.5, 0.5))


def test_digits_nearest_upsampling_matches_kron(sk_digits):
    ds = DigitsDataset("val", image_size=32, interpolation="nearest")
    for i in (0, 7, len(ds) - 1):
        src = sk_digits.images[int(ds.source_indices[i])] / 16.0
        expected = np.kron(src, np.ones((4, 4)))
        np.testing.assert_allclose(ds[i][0][0].numpy(), expected, atol=1e-6)
        assert ds[i][1] == sk_digits.target[int(ds.source_indices[i])]


def test_digits_splits_cover_all_and_values_in_range():
    sets = {s: DigitsDataset(s) for s in ("train", "val", "test")}
    ids = [set(d.source_indices.tolist()) for d in sets.values()]
    assert sum(len(i) for i in ids) == 1797 and len(set.union(*ids)) == 1797
    d = sets["test"]
    assert d[0][0].shape == (1, 32, 32) and d.input_size == (1, 32, 32)
    assert float(d.images.min()) >= 0.0 and float(d.images.max()) <= 1.0
    assert float((d.images < 0.05).float().mean()) > 0.3  # much black background (value 0)


def test_digits_stroke_mask_and_box_oracle():
    ds = DigitsDataset("test", stroke_threshold=0.5, return_annotations=True)
    for i in (0, 5, 99):
        img = ds.images[i, 0].numpy()
        mask = img > 0.5
        assert np.array_equal(ds.stroke_mask(i).numpy(), mask)
        ys, xs = np.nonzero(mask)
        assert ds.box(i) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        item = ds[i]
        assert item["box_mask"][ys, xs].all() and int(item["box_mask"].sum()) == (
            (xs.max() + 1 - xs.min()) * (ys.max() + 1 - ys.min())
        )


def test_cluttered_digits_geometry_and_determinism(sk_digits):
    a = ClutteredDigitsDataset("val", canvas_size=64, digit_size=32, num_distractors=3)
    b = ClutteredDigitsDataset("val", canvas_size=64, digit_size=32, num_distractors=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.boxes, b.boxes)
    digits = DigitsDataset("val", image_size=32)
    pos = {int(s): k for k, s in enumerate(digits.source_indices)}
    ink_outside = 0
    for i in range(0, len(a), 37):
        x0, y0, x1, y1 = a.box(i)
        mask = a.stroke_mask(i).numpy()
        ys, xs = np.nonzero(mask)
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x0, y0, x1, y1)
        # the target's stroke pixels carry the source digit's values (fragments never overlap the target)
        src = digits.images[pos[int(a.source_indices[i])], 0].numpy()
        assert np.isclose(np.sort(a.images[i, 0].numpy()[mask]), np.sort(src[src > 0.5]), atol=1e-6).all()
        assert a[i][1] == sk_digits.target[int(a.source_indices[i])]
        outside = a.images[i, 0].numpy().copy()
        outside[y0:y1, x0:x1] = 0
        ink_outside += int((outside > 0.5).sum())
    assert ink_outside > 0
    clean = ClutteredDigitsDataset("val", num_distractors=0)
    for i in range(0, len(clean), 50):
        x0, y0, x1, y1 = clean.box(i)
        rest = clean.images[i, 0].clone()
        rest[y0:y1, x0:x1] = 0
        assert float(rest.max()) < 0.5


def test_cluttered_splits_never_share_a_source_digit():
    ids = [set(ClutteredDigitsDataset(s, samples_per_digit=2).source_indices.tolist()) for s in ("train", "test")]
    assert not ids[0] & ids[1]
    assert len(ClutteredDigitsDataset("test", samples_per_digit=2)) == 2 * len(DigitsDataset("test"))


def test_cluttered_bad_geometry():
    with pytest.raises(ValueError, match="digit_size"):
        ClutteredDigitsDataset("val", canvas_size=32, digit_size=48)
    with pytest.raises(ValueError, match="fragment_size"):
        ClutteredDigitsDataset("val", fragment_size=0)


def test_annotation_dicts_collate():
    ds = ClutteredDigitsDataset("test", return_annotations=True)
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch["input"].shape == (4, 1, 64, 64)
    assert batch["box_mask"].dtype == torch.bool and batch["stroke_mask"].shape == (4, 64, 64)
    assert batch["box"].shape == (4, 4) and batch["index"].tolist() == [0, 1, 2, 3]


def test_tabular_standardisation_on_train():
    train = TabularDataset("breast_cancer", "train")
    test = TabularDataset("breast_cancer", "test")
    val = TabularDataset("breast_cancer", "val")
    assert len(train) + len(val) + len(test) == 569 and train.num_features == 30 and train.num_classes == 2
    np.testing.assert_allclose(train.features.mean(0).numpy(), 0, atol=1e-5)
    np.testing.assert_allclose(train.features.std(0, unbiased=False).numpy(), 1, atol=1e-4)
    raw = TabularDataset("breast_cancer", "test", standardize=False)
    np.testing.assert_allclose((raw.features - train.mean) / train.std, test.features, atol=1e-5)
    wine = TabularDataset("wine", "val")
    assert wine.num_classes == 3 and wine.input_size == (13,) and wine.informative_features is None


def test_synthetic_informative_features_carry_the_signal():
    kwargs = dict(n_samples=1500, n_features=20, n_informative=5, n_classes=3)
    train, test = (TabularDataset("synthetic", s, **kwargs) for s in ("train", "test"))
    informative = train.informative_features.numpy()
    assert len(set(informative.tolist())) == 5 and sorted(informative.tolist()) != [0, 1, 2, 3, 4]
    noise = np.setdiff1d(np.arange(20), informative)

    def accuracy(cols):
        clf = KNeighborsClassifier(15).fit(train.features[:, cols].numpy(), train.labels.numpy())
        return clf.score(test.features[:, cols].numpy(), test.labels.numpy())

    assert accuracy(informative) > 0.8
    assert accuracy(noise) < 0.45  # chance is 1/3
    _, p = f_classif(train.features[:, noise].numpy(), train.labels.numpy())
    assert p.min() > 1e-4


def test_make_dataset_names():
    assert isinstance(make_dataset("digits", "test"), DigitsDataset)
    assert isinstance(make_dataset("wine", "train"), TabularDataset)
    with pytest.raises(ValueError, match="cluttered_digits"):
        make_dataset("cluttered_digit", "test")
    with pytest.raises(ValueError, match="root"):
        make_dataset("imagenet")
