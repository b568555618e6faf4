"""open_clip zero-shot classifier on a tiny registered config (random init, offline SimpleTokenizer)."""

import json

import open_clip
import pytest
import torch
import torch.nn.functional as F

from recalx_lightning.models import WeightsUnavailableError, create_model, create_transform, model_info

TINY = "tinyclip-recalx-test"  # no "siglip" in the name: that would ask the hub for a tokenizer
NAMES = ["cat", "dog", "car"]
TEMPLATES = ["a photo of a {}.", "a drawing of a {}."]


@pytest.fixture(scope="module", autouse=True)
def tiny_config(tmp_path_factory):
    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    path = tmp_path_factory.mktemp("clipcfg") / f"{TINY}.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)


def test_logits_are_scaled_cosine_similarities(tmp_path):
    cache = tmp_path / "emb.pt"
    model = create_model(f"open_clip:{TINY}", class_names=NAMES, templates=TEMPLATES, class_embeddings_path=cache)
    assert cache.is_file() and not model.training
    # independent oracle: a freshly built CLIP with the same seed gives the same random weights
    torch.manual_seed(0)
    ref = create_model(f"open_clip:{TINY}", class_names=NAMES, templates=TEMPLATES)
    torch.manual_seed(0)
    clip = open_clip.create_model(TINY).eval()
    tok = open_clip.get_tokenizer(TINY)
    with torch.no_grad():
        per_class = []
        for name in NAMES:
            emb = F.normalize(clip.encode_text(tok([t.format(name) for t in TEMPLATES])), dim=-1)
            per_class.append(F.normalize(emb.mean(0), dim=-1))
        text = torch.stack(per_class)
        x = torch.randn(4, 3, 32, 32)
        image = F.normalize(clip.encode_image(x), dim=-1)
        expected = clip.logit_scale.exp() * image @ text.T
        torch.testing.assert_close(ref(x), expected, atol=1e-5, rtol=1e-5)
    info = model_info(model)
    assert info.num_classes == 3 and info.input_size == (3, 32, 32) and info.patch_grid == (4, 4)
    assert info.mean == pytest.approx(open_clip.OPENAI_DATASET_MEAN)
    assert create_transform(model) is not None


def test_cached_embeddings_are_reused_without_text_tower(tmp_path, monkeypatch):
    cache = tmp_path / "emb.pt"
    first = create_model(f"open_clip:{TINY}", class_names=NAMES, templates=TEMPLATES, class_embeddings_path=cache)

    def boom(*args, **kwargs):
        raise AssertionError("text embeddings recomputed despite the cache")

    monkeypatch.setattr(open_clip, "build_zero_shot_classifier", boom)
    monkeypatch.setattr(open_clip, "get_tokenizer", boom)
    again = create_model(f"open_clip:{TINY}", class_embeddings_path=cache)
    assert again.class_names == NAMES
    torch.testing.assert_close(again.class_embeddings, first.class_embeddings)
    with pytest.raises(ValueError, match="other class names"):
        create_model(f"open_clip:{TINY}", class_names=["a", "b"], class_embeddings_path=cache)


def test_precomputed_embeddings_and_class_name_files(tmp_path):
    emb = torch.randn(4, 16)
    model = create_model(f"open_clip:{TINY}", class_embeddings=emb)
    torch.testing.assert_close(model.class_embeddings, F.normalize(emb, dim=-1))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    keras = tmp_path / "index.json"
    keras.write_text(json.dumps({"1": ["n2", "great_white"], "0": ["n1", "tench"]}))
    txt = tmp_path / "names.txt"
    txt.write_text("tench\n\ngreat white\n")
    for source in (keras, txt):
        m = create_model(f"open_clip:{TINY}", class_names=source, templates=TEMPLATES)
        assert m.class_names == ["tench", "great white"]
    with pytest.raises(ValueError, match="4 rows but 2 class names"):
        create_model(f"open_clip:{TINY}", class_names=["a", "b"], class_embeddings=emb)


def test_bad_open_clip_inputs(monkeypatch):
    with pytest.raises(ValueError, match="class_names"):
        create_model(f"open_clip:{TINY}")
    with pytest.raises(ValueError, match="templates"):
        create_model(f"open_clip:{TINY}", class_names=NAMES, templates=["no placeholder"])
    with pytest.raises(ValueError, match="ViT-B-16-SigLIP"):
        create_model("open_clip:ViT-B-16-SigLIPP/webli", class_names=NAMES)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsUnavailableError, match="pretrained='/path"):
        create_model("open_clip:ViT-B-32/openai", class_embeddings=torch.randn(3, 512))
