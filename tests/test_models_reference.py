"""Reference models: short deterministic training, atomic cache, reload without retraining, command line."""

import json

import pytest
import torch

from recalx_lightning.models import (
    REFERENCE_MODELS,
    create_model,
    load_reference_model,
    model_info,
    train_reference_model,
)
from recalx_lightning.models import reference as ref


def test_short_training_is_deterministic_and_recorded(tmp_path):
    kwargs = dict(cache_dir=tmp_path, epochs=1, max_train_samples=96)
    a, record = train_reference_model("digits_cnn", **kwargs)
    b, _ = train_reference_model("digits_cnn", **kwargs, save=False)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k
    stored = json.loads((tmp_path / "reference" / "digits_cnn.json").read_text())
    assert stored == json.loads(json.dumps(record))
    assert set(stored["accuracy"]) == {"train", "val", "test"} and stored["seed"] == 0
    assert {"torch", "timm", "sklearn"} <= set(stored["versions"])
    assert not list((tmp_path / "reference").glob(".*tmp"))  # no leftovers of the atomic writes
    info = model_info(a)
    assert info.input_size == (1, 32, 32) and info.mean == (0.0,) and info.std == (1.0,)
    # a shortened run never stands in for the real recipe
    with pytest.raises(FileNotFoundError, match="python -m recalx_lightning.models.reference train"):
        load_reference_model("digits_cnn", cache_dir=tmp_path, train_if_missing=False)


def test_load_trains_once_then_reads_cache(tmp_path, monkeypatch):
    model = load_reference_model("wine_mlp", cache_dir=tmp_path)  # full recipe: well under a second
    from recalx_lightning.data import TabularDataset

    test = TabularDataset("wine", "test")
    acc = (model(test.features).argmax(-1) == test.labels).float().mean()
    assert acc >= 0.9

    def no_training(*args, **kwargs):
        raise AssertionError("retrained although cached")

    monkeypatch.setattr(ref, "train_reference_model", no_training)
    again = create_model("reference:wine_mlp", cache_dir=tmp_path, train_if_missing=False)
    torch.testing.assert_close(again(test.features), model(test.features))
    assert not again.training and model_info(again).name == "reference:wine_mlp"


def test_env_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("RECALX_CACHE", str(tmp_path / "env"))
    assert ref.default_cache_dir() == tmp_path / "env"


def test_vit_and_densenet_specs_build():
    for name in ("digits_vit", "digits_densenet", "cluttered_densenet"):
        spec = REFERENCE_MODELS[name]
        model = ref._build(name, spec).eval()
        assert model(torch.zeros(2, *spec.input_size)).shape == (2, 10)
    assert model_info(ref._build("digits_vit", REFERENCE_MODELS["digits_vit"])).patch_grid == (8, 8)


def test_command_line(tmp_path, capsys):
    assert ref.main(["train", "breast_cancer_mlp", "--cache-dir", str(tmp_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "breast_cancer_mlp: train" in out and "test 0.9" in out
    assert (tmp_path / "reference" / "breast_cancer_mlp.pt").is_file()
    assert ref.main(["list"]) == 0
    with pytest.raises(ValueError, match="Did you mean"):
        ref.main(["train", "wine_mpl", "--cache-dir", str(tmp_path)])
