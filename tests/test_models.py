"""Model factory: tiny timm models, local weights, key-mismatch errors, offline hub failures, MLP and imports."""

import time

import pytest
import timm
import torch

from recalx_lightning.models import (
    MLP,
    ModelInfo,
    SmallCNN,
    WeightsUnavailableError,
    check_model_data,
    create_model,
    create_transform,
    model_info,
    set_model_info,
)

TINY_VIT = dict(img_size=32, patch_size=4, embed_dim=32, depth=1, num_heads=2, num_classes=5)
TINY_DENSENET = dict(growth_rate=4, block_config=(1, 1), in_chans=1, num_classes=3)


@pytest.fixture
def tiny_vit():
    return create_model("timm:vit_tiny_patch16_224", pretrained=False, **TINY_VIT)


def test_timm_tiny_vit_info_and_transform(tiny_vit):
    assert not tiny_vit.training
    x = torch.randn(2, 3, 32, 32)
    assert tiny_vit(x).shape == (2, 5)
    info = model_info(tiny_vit)
    assert info == ModelInfo(
        num_classes=5,
        input_size=(3, 32, 32),
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        patch_grid=(8, 8),
        interpolation="bicubic",
        crop_pct=0.9,
        name="timm:vit_tiny_patch16_224",
    )
    from PIL import Image

    image = Image.new("RGB", (50, 40), (255, 0, 0))
    out = create_transform(tiny_vit)(image)
    assert out.shape == (3, 32, 32)
    torch.testing.assert_close(out[:, 16, 16], torch.tensor([1.0, -1.0, -1.0]))  # (v - 0.5) / 0.5


def test_plain_timm_name_and_single_channel_densenet():
    model = create_model("densenet121", pretrained=False, **TINY_DENSENET)
    info = model_info(model)
    assert info.num_classes == 3 and info.input_size[0] == 1 and info.patch_grid is None
    assert len(info.mean) == 1 and info.mean[0] == pytest.approx((0.485 + 0.456 + 0.406) / 3)
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 3)


def test_model_info_falls_back_to_timm_config():
    raw = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY_VIT)
    assert model_info(raw).patch_grid == (8, 8) and model_info(raw).input_size == (3, 32, 32)
    with pytest.raises(ValueError, match="set_model_info"):
        model_info(torch.nn.Linear(3, 2))


def test_checkpoint_path_roundtrip_and_key_errors(tmp_path, tiny_vit):
    path = tmp_path / "vit.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in tiny_vit.state_dict().items()}}, path)
    loaded = create_model("vit_tiny_patch16_224", checkpoint_path=path, **TINY_VIT)
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(loaded(x), tiny_vit(x))
    with pytest.raises(ValueError, match=r"missing keys: blocks\.1\..*shape mismatches: head\.weight"):
        create_model("vit_tiny_patch16_224", checkpoint_path=path, **{**TINY_VIT, "depth": 2, "num_classes": 7})


def test_pretrained_file_loads_and_adapts(tmp_path, tiny_vit):
    path = tmp_path / "vit.pth"
    torch.save(tiny_vit.state_dict(), path)
    same = create_model("vit_tiny_patch16_224", pretrained_file=path, **TINY_VIT)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(same(x), tiny_vit(x))
    new_head = create_model("vit_tiny_patch16_224", pretrained_file=path, **{**TINY_VIT, "num_classes": 3})
    own = tiny_vit.state_dict()
    assert all(torch.equal(v, own[k]) for k, v in new_head.state_dict().items() if not k.startswith("head"))
    with pytest.raises(ValueError, match=r"(?s)pretrained_file.*blocks\.1"):
        create_model("vit_tiny_patch16_224", pretrained_file=path, **{**TINY_VIT, "depth": 2})
    with pytest.raises(ValueError, match="does not exist"):
        create_model("vit_tiny_patch16_224", pretrained_file=tmp_path / "nope.pth", **TINY_VIT)


def test_local_dir_roundtrip(tmp_path, tiny_vit):
    from timm.models import save_for_hf

    save_for_hf(tiny_vit, str(tmp_path / "hfdir"), model_args=TINY_VIT)
    for kwargs in ({"local_dir": tmp_path / "hfdir"}, {}):
        name = "vit_tiny_patch16_224" if kwargs else f"local-dir:{tmp_path / 'hfdir'}"
        model = create_model(name, **kwargs)
        x = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(model(x), tiny_vit(x))


def test_hub_weights_offline_fail_fast_with_hint(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailableError, match="pretrained_file=.*checkpoint_path=.*local-dir:"):
        create_model("timm:resnet18", pretrained=True)
    assert time.perf_counter() - start < 10


def test_unknown_names_suggest_close_ones():
    with pytest.raises(ValueError, match=r"Closest known names: \['resnet18'"):
        create_model("resnt18", pretrained=False)
    with pytest.raises(ValueError, match=r"Did you mean \[.digits_cnn."):
        create_model("reference:digit_cnn")
    with pytest.raises(ValueError, match="scheme"):
        create_model("torchhub:resnet18")
    with pytest.raises(ValueError, match="name"):
        create_model("")


def test_mlp_scheme_and_checkpoint(tmp_path):
    model = create_model("mlp", in_features=6, num_classes=3, hidden_sizes=(8,))
    assert isinstance(model, MLP) and model_info(model).input_size == (6,) and model_info(model).mean is None
    assert model(torch.randn(4, 6)).shape == (4, 3)
    path = tmp_path / "mlp.pt"
    torch.save(model.state_dict(), path)
    again = create_model("mlp", in_features=6, num_classes=3, hidden_sizes=(8,), checkpoint_path=path)
    x = torch.randn(4, 6)
    torch.testing.assert_close(again(x), model(x))
    with pytest.raises(ValueError, match=r"net\.2\.weight: file \(3, 8\) vs model \(4, 8\)"):
        create_model("mlp", in_features=6, num_classes=4, hidden_sizes=(8,), checkpoint_path=path)
    with pytest.raises(ValueError, match="in_features"):
        create_model("mlp", num_classes=3)


def test_import_scheme(tmp_path, monkeypatch):
    monkeypatch.setenv("RECALX_ALLOW_IMPORT", "1")
    ref = SmallCNN(1, 4, width=4)
    path = tmp_path / "cnn.pt"
    torch.save(ref.state_dict(), path)
    info = {"num_classes": 4, "input_size": (1, 16, 16), "mean": (0.0,), "std": (1.0,)}
    model = create_model(
        "import:recalx_lightning.models.modules:SmallCNN",
        init_args={"in_chans": 1, "num_classes": 4, "width": 4},
        checkpoint_path=path,
        info=info,
    )
    ref.eval()
    x = torch.rand(2, 1, 16, 16)
    torch.testing.assert_close(model(x), ref(x))
    assert model_info(model).input_size == (1, 16, 16)
    with pytest.raises(ValueError, match="info="):
        create_model("import:torch.nn:Linear", init_args={"in_features": 2, "out_features": 2})
    with pytest.raises(ValueError, match="cannot import"):
        create_model("import:recalx_lightning.models.modules:Nope")


def test_check_model_data_mismatch():
    model = set_model_info(MLP(13, 2), ModelInfo(num_classes=2, input_size=(13,)))
    from recalx_lightning.data import TabularDataset

    with pytest.raises(ValueError, match="dataset has 3 classes but the classifier outputs 2"):
        check_model_data(model, TabularDataset("wine", "val"))
    check_model_data(create_model("mlp", in_features=13, num_classes=3), TabularDataset("wine", "val"))


def test_unreachable_hub_switches_to_offline_mode_temporarily(monkeypatch):
    from huggingface_hub import constants

    from recalx_lightning.models import _hub

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("RECALX_SKIP_HUB_PROBE", raising=False)
    monkeypatch.setattr(_hub, "hub_reachable", lambda: False)
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailableError, match="local weights"):
        create_model("timm:resnet18", pretrained=True)
    assert time.perf_counter() - start < 10
    assert constants.HF_HUB_OFFLINE is False  # restored
