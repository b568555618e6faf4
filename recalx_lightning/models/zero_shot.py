"""open_clip zero-shot classifiers: K-way logits = logit scale · cosine(image embedding, class text embedding).

The class text embeddings (K, D) are the normalised mean over prompt templates of the normalised text
embeddings (open_clip's ``build_zero_shot_classifier``). Building them for 1000 classes takes over an hour on a
CPU for SigLIP-B/16, so they are cached to a file and accepted precomputed; with a cache the text tower and the
tokenizer (which for SigLIP needs hub files) are never touched. SigLIP's logit bias is the same for every class
and cancels in a softmax, so it is left out.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recalx_lightning.models._hub import is_hub_error, offline_if_unreachable, weights_error
from recalx_lightning.models.info import TRANSFORM_ATTR, ModelInfo, set_model_info

DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "a close-up photo of a {}.",
    "itap of a {}.",
)


class ZeroShotClassifier(nn.Module):
    """Image tower + fixed class embeddings: (n, 3, H, W) → logits (n, K) = scale · cos(visual(x), E_k).

    Args:
        visual: the open_clip image encoder (``clip_model.visual``), (n, 3, H, W) → (n, D).
        class_embeddings: (K, D) class text embeddings (normalised here).
        logit_scale: the multiplier of the cosine similarities (``clip_model.logit_scale.exp()``).
        class_names: optional names of the K classes, kept for reference.
    """

    def __init__(
        self,
        visual: nn.Module,
        class_embeddings: Tensor,
        logit_scale: float,
        class_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if class_embeddings.ndim != 2 or class_embeddings.shape[0] < 2:
            raise ValueError(
                f"`class_embeddings` must have shape (K, D) with K >= 2 classes, got {tuple(class_embeddings.shape)}."
            )
        self.visual = visual
        self.register_buffer("class_embeddings", F.normalize(class_embeddings.float(), dim=-1))
        self.register_buffer("logit_scale", torch.tensor(float(logit_scale)))
        self.class_names = list(class_names) if class_names is not None else None
        self.num_classes = class_embeddings.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        features = F.normalize(self.visual(x), dim=-1)
        return self.logit_scale * features @ self.class_embeddings.T


def read_class_names(source: Sequence[str] | str | os.PathLike) -> list[str]:
    """Class names from a list, ``"imagenet"`` (open_clip's 1000 ImageNet names), a JSON file (a list, a
    Keras-style ``{"0": [wnid, name]}`` map, or ``{name: index}``) or a text file with one name per line."""
    if isinstance(source, str) and source == "imagenet":
        from open_clip import IMAGENET_CLASSNAMES

        return list(IMAGENET_CLASSNAMES)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise ValueError(
                f"`class_names` file {str(path)!r} does not exist; pass a list of names, 'imagenet', or a "
                "JSON/text file with one name per class."
            )
        if path.suffix.lower() == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict):
                items = list(data.items())
                if items and isinstance(items[0][1], (list, tuple)):
                    return [v[1].replace("_", " ") for _, v in sorted(items, key=lambda kv: int(kv[0]))]
                return [k for k, _ in sorted(items, key=lambda kv: int(kv[1]))]
            return [str(v) for v in data]
        return [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    names = list(source)
    if not all(isinstance(n, str) for n in names):
        raise ValueError("`class_names` must be strings.")
    return names


def load_class_embeddings(path: str | os.PathLike) -> tuple[Tensor, list[str]]:
    """A class-embedding cache (``{"embeddings": (K, D), "class_names": [K names]}``), read weights-only and
    checked: a 2-D finite floating-point matrix with one row per class name."""
    from recalx_lightning.checkpoints import read_weights_only

    stored = read_weights_only(path, "class-embedding file")
    where = f"class-embedding file {str(path)!r}"
    if not isinstance(stored, dict) or not {"embeddings", "class_names"} <= stored.keys():
        raise ValueError(f"{where} is not an embedding cache (needs 'embeddings' and 'class_names'); delete it.")
    embeddings, names = stored["embeddings"], stored["class_names"]
    if not isinstance(embeddings, Tensor) or embeddings.ndim != 2 or not embeddings.is_floating_point():
        shape = tuple(embeddings.shape) if isinstance(embeddings, Tensor) else type(embeddings).__name__
        raise ValueError(f"{where}: 'embeddings' must be a (K, D) float matrix, got {shape}; delete it.")
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{where}: 'class_names' must be a list of strings; delete it.")
    if len(names) != embeddings.shape[0]:
        raise ValueError(f"{where} has {embeddings.shape[0]} embeddings for {len(names)} class names; delete it.")
    if not torch.isfinite(embeddings).all():
        raise ValueError(f"{where} holds non-finite embeddings; delete it to recompute them.")
    return embeddings, list(names)


def _save_atomic(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def create_open_clip_classifier(
    spec: str,
    class_names: Sequence[str] | str | os.PathLike | None = None,
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    class_embeddings: Tensor | None = None,
    class_embeddings_path: str | os.PathLike | None = None,
    pretrained: str | None = None,
    cache_dir: str | None = None,
    batch_classes: int = 50,
) -> ZeroShotClassifier:
    """Build a zero-shot classifier from ``"<model>/<pretrained tag>"`` (e.g. ``"ViT-B-16-SigLIP/webli"``).

    Class embeddings, in order of precedence: ``class_embeddings`` (K, D); the file ``class_embeddings_path``
    if it exists; else computed from ``class_names`` × ``templates`` and saved to ``class_embeddings_path``.
    ``pretrained`` (a tag or a local checkpoint file) overrides the tag in ``spec``; without any tag the model
    is randomly initialised (tests).
    """
    import open_clip

    model_name, _, tag = spec.partition("/")
    pretrained = pretrained or tag or None
    if model_name not in open_clip.list_models() and not model_name.startswith(("hf-hub:", "local-dir:")):
        import difflib

        close = difflib.get_close_matches(model_name, open_clip.list_models(), n=5, cutoff=0.5)
        raise ValueError(f"unknown open_clip model {model_name!r}. Closest known: {close}.")
    if not templates or not all(isinstance(t, str) and "{}" in t for t in templates):
        raise ValueError("`templates` must be a non-empty list of strings with a '{}' for the class name.")
    names = read_class_names(class_names) if class_names is not None else None
    cache = Path(class_embeddings_path) if class_embeddings_path is not None else None
    if class_embeddings is None and cache is not None and cache.is_file():
        class_embeddings, stored_names = load_class_embeddings(cache)
        if names is not None and stored_names != names:
            raise ValueError(
                f"cached class embeddings {str(cache)!r} were built for {len(stored_names)} other class "
                f"names than the {len(names)} given; delete the file or point `class_embeddings_path` elsewhere."
            )
        names = stored_names
    if class_embeddings is None and names is None:
        raise ValueError(
            "an open_clip zero-shot classifier needs `class_names` (a list, 'imagenet' or a file), "
            "`class_embeddings`, or an existing `class_embeddings_path`."
        )
    if class_embeddings is not None and names is not None and class_embeddings.shape[0] != len(names):
        raise ValueError(
            f"`class_embeddings` has {class_embeddings.shape[0]} rows but {len(names)} class names were given."
        )
    try:
        with offline_if_unreachable(enabled=bool(pretrained)):
            clip, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained)
    except (OSError, RuntimeError) as err:
        if pretrained and is_hub_error(err):
            raise weights_error(
                f"open_clip:{spec}",
                err,
                "Point at local weights: `pretrained='/path/open_clip_pytorch_model.bin'` (or .safetensors), or "
                "a name 'open_clip:local-dir:/path/to/folder' with open_clip_config.json and the weights.",
            ) from err
        raise
    clip.eval()
    if class_embeddings is None:
        tokenizer = open_clip.get_tokenizer(model_name)
        with torch.no_grad():
            weights = open_clip.build_zero_shot_classifier(
                clip, tokenizer, names, list(templates), num_classes_per_batch=batch_classes
            )
        class_embeddings = weights.T.contiguous()  # (D, K) → (K, D)
        if cache is not None:
            _save_atomic(
                {
                    "embeddings": class_embeddings,
                    "class_names": names,
                    "templates": list(templates),
                    "model": model_name,
                    "pretrained": pretrained,
                },
                cache,
            )
    classifier = ZeroShotClassifier(clip.visual, class_embeddings, clip.logit_scale.detach().exp().item(), names)
    cfg = getattr(clip.visual, "preprocess_cfg", {}) or {}
    size = cfg.get("size", getattr(clip.visual, "image_size", 224))
    size = (size, size) if isinstance(size, int) else tuple(size)
    grid = getattr(clip.visual, "grid_size", None)
    if grid is None:
        grid = getattr(getattr(getattr(clip.visual, "trunk", None), "patch_embed", None), "grid_size", None)
    set_model_info(
        classifier,
        ModelInfo(
            num_classes=classifier.num_classes,
            input_size=(3, *size),
            mean=tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
            std=tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD)),
            patch_grid=None if grid is None else tuple(int(g) for g in grid),
            interpolation=cfg.get("interpolation"),
            name=f"open_clip:{spec}",
        ),
    )
    setattr(classifier, TRANSFORM_ATTR, preprocess)
    return classifier.eval()
