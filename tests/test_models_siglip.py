"""The SigLIP code path offline: a tiny SigLIP-style open_clip config (custom text tower, logit bias, Hugging Face
tokenizer) whose tokenizer folder the test builds with the `tokenizers` library; local weights; the
class-embedding file built by the CLI and read by `fit`-time model construction; one-line offline failures."""

import json
import string
import time

import open_clip
import pytest
import torch
import torch.nn.functional as F

from recalx_lightning.lightning.cli import main
from recalx_lightning.models import create_model, model_info
from recalx_lightning.models.zero_shot import TokenizerUnavailableError, load_class_embeddings

TINY = "tinysig-recalx-test"  # no "siglip" in the name: open_clip would pick its hub tokenizer by name
NAMES = ["tench", "goldfish", "great white shark"]
TEMPLATES = ["a photo of a {}.", "itap of a {}."]
WORDS = ["a", "photo", "of", "itap", "tench", "goldfish", "great", "white", "shark", "."]


def build_tokenizer_dir(path):
    """A word-level Hugging Face tokenizer folder (tokenizer.json + tokenizer_config.json), SigLIP-like: an
    end-of-sequence token appended, padding with <pad>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "<pad>", "eos_token": "</s>",
        "unk_token": "<unk>", "model_max_length": 16,
    }))
    return path, len(vocab)


def siglip_like_config(tokenizer_name: str, vocab_size: int) -> dict:
    """ViT-B-16-SigLIP's text settings (custom text, no causal mask, last-token pooling, logit bias), tiny."""
    return {
        "embed_dim": 16,
        "init_logit_bias": -10,
        "custom_text": True,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {
            "context_length": 16, "vocab_size": vocab_size, "hf_tokenizer_name": tokenizer_name,
            "tokenizer_kwargs": {"clean": "canonicalize"}, "width": 32, "heads": 2, "layers": 1,
            "no_causal_mask": True, "proj_bias": True, "pool_type": "last", "norm_kwargs": {"eps": 1e-6},
        },
    }


@pytest.fixture(scope="module")
def tiny_siglip(tmp_path_factory):
    """Registers two configs: one naming the local tokenizer folder, one naming a hub tokenizer (not cached)."""
    root = tmp_path_factory.mktemp("siglip")
    tokenizer_dir, vocab_size = build_tokenizer_dir(root / "tokenizer")
    for name, source in ((TINY, str(tokenizer_dir)), (f"{TINY}-hub", "recalx-test/no-such-tokenizer")):
        path = root / f"{name}.json"
        path.write_text(json.dumps(siglip_like_config(source, vocab_size)))
        open_clip.add_model_config(path)
    torch.manual_seed(0)
    clip = open_clip.create_model(TINY).eval()
    weights = root / "open_clip_model.pt"
    torch.save(clip.state_dict(), weights)
    return {"root": root, "tokenizer": tokenizer_dir, "weights": weights, "clip": clip}


def _oracle_logits(clip, tokenizer_dir, x):
    """Independent formula: HF tokenizer ids → text tower → mean over templates → scale · cosine."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    with torch.no_grad():
        rows = []
        for name in NAMES:
            # SigLIP's text cleaning ("canonicalize"): lower case, punctuation removed
            texts = [t.format(name).lower().translate(str.maketrans("", "", string.punctuation)).strip()
                     for t in TEMPLATES]
            ids = hf(texts, padding="max_length", max_length=16, truncation=True, return_tensors="pt").input_ids
            rows.append(F.normalize(F.normalize(clip.encode_text(ids), dim=-1).mean(0), dim=-1))
        image = F.normalize(clip.encode_image(x), dim=-1)
        return clip.logit_scale.exp() * image @ torch.stack(rows).T


def test_siglip_path_with_local_tokenizer_and_local_weights(tiny_siglip):
    model = create_model(f"open_clip:{TINY}", pretrained=str(tiny_siglip["weights"]), class_names=NAMES,
                         templates=TEMPLATES)
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(model(x), _oracle_logits(tiny_siglip["clip"], tiny_siglip["tokenizer"], x),
                               atol=1e-5, rtol=1e-5)
    assert model_info(model).patch_grid == (4, 4) and model_info(model).num_classes == 3


def test_tokenizer_option_replaces_an_unavailable_hub_tokenizer(tiny_siglip):
    start = time.perf_counter()
    with pytest.raises(TokenizerUnavailableError, match="tokenizer='/path/folder'"):
        create_model(f"open_clip:{TINY}-hub", class_names=NAMES, templates=TEMPLATES)
    assert time.perf_counter() - start < 10
    model = create_model(f"open_clip:{TINY}-hub", pretrained=str(tiny_siglip["weights"]), class_names=NAMES,
                         templates=TEMPLATES, tokenizer=str(tiny_siglip["tokenizer"]))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), _oracle_logits(tiny_siglip["clip"], tiny_siglip["tokenizer"], x),
                               atol=1e-5, rtol=1e-5)


def test_class_embeddings_command_builds_the_file_that_fit_reads_offline(tiny_siglip, tmp_path, capsys):
    output = tmp_path / "emb.pt"
    names = tmp_path / "names.txt"
    names.write_text("\n".join(NAMES))
    main(["class-embeddings", "--model", f"open_clip:{TINY}-hub", "--class_names", str(names),
          "--templates", json.dumps(TEMPLATES), "--tokenizer", str(tiny_siglip["tokenizer"]),
          "--pretrained", str(tiny_siglip["weights"]), "--output", str(output)])
    embeddings, stored_names = load_class_embeddings(output)
    assert embeddings.shape == (3, 16) and stored_names == NAMES
    assert "wrote" in capsys.readouterr().out
    # the hub tokenizer is unavailable, yet the file alone is enough
    model = create_model(f"open_clip:{TINY}-hub", pretrained=str(tiny_siglip["weights"]), class_embeddings_path=output)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), _oracle_logits(tiny_siglip["clip"], tiny_siglip["tokenizer"], x),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"class_embeddings_path": "MISSING"}, "class-embeddings --model"),
        ({"class_names": NAMES, "class_embeddings_path": "MISSING"}, "does not exist, so the text embeddings"),
        ({"class_embeddings": torch.randn(3, 16), "pretrained": "/no/such/weights.safetensors"}, "does not exist"),
    ],
)
def test_offline_failures_are_one_line_and_fast(tiny_siglip, tmp_path, kwargs, message):
    kwargs = {k: (str(tmp_path / "emb.pt") if v == "MISSING" else v) for k, v in kwargs.items()}
    start = time.perf_counter()
    with pytest.raises((ValueError, TokenizerUnavailableError), match=message) as info:
        create_model(f"open_clip:{TINY}-hub", **kwargs)
    assert time.perf_counter() - start < 10 and "\n" not in str(info.value)


def test_cli_errors_are_one_line(tiny_siglip, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["class-embeddings", "--model", f"open_clip:{TINY}-hub", "--class_names", "imagenet",
              "--output", str(tmp_path / "emb.pt")])
    err = capsys.readouterr().err.strip()
    assert err.startswith("recalx_lightning: error:") and "tokenizer" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "emb.pt").exists()


def test_siglip_config_fits_offline_from_the_class_embedding_file(tiny_siglip, tmp_path, monkeypatch):
    """configs/siglip.yaml through the CLI with the tiny model: local weights + the file, the hub tokenizer unused."""
    import sys
    from pathlib import Path

    from tests.fake_imagenet import build_fake_imagenet
    from tests.test_imagenet_end_to_end import tensorboard_tags

    monkeypatch.setattr(sys, "argv", ["recalx"])
    data = build_fake_imagenet(tmp_path / "imagenet", num_images=12, num_classes=3, labelled_classes=3, size=(40, 36))
    names = tmp_path / "names.txt"
    names.write_text("\n".join(NAMES))
    embeddings = tmp_path / "emb.pt"
    main(["class-embeddings", "--model", f"open_clip:{TINY}", "--class_names", str(names), "--templates",
          json.dumps(TEMPLATES), "--pretrained", str(tiny_siglip["weights"]), "--output", str(embeddings)])
    config = Path(__file__).resolve().parents[1] / "configs" / "siglip.yaml"
    main(["fit", "--config", str(config),
          "--model.init_args.model", f"open_clip:{TINY}-hub",
          "--model.init_args.model_kwargs.pretrained", str(tiny_siglip["weights"]),
          "--model.init_args.model_kwargs.class_names", str(names),
          "--model.init_args.model_kwargs.class_embeddings_path", str(embeddings),
          "--data.init_args.dataset_kwargs.root", str(data["folders"]),
          "--data.init_args.dataset_kwargs.class_index", str(data["class_index"]),
          "--data.init_args.patch_size", "8",
          "--data.init_args.num_calibration_samples", "6", "--data.init_args.num_eval_samples", "6",
          "--data.init_args.subsets_per_bin", "2", "--data.init_args.eval_subsets_per_bin", "2",
          "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
          "--trainer.logger.init_args.save_dir", str(tmp_path / "logs")])
    scalars = set(tensorboard_tags(tmp_path / "logs" / "siglip" / "version_0")["scalars"])
    assert {f"temperature/binned/bin_{b}" for b in range(10)} <= scalars
