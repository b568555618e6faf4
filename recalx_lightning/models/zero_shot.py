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


def load_class_embeddings(
    path: str | os.PathLike, class_names: Sequence[str] | None = None
) -> tuple[Tensor, list[str]]:
    """``(embeddings (K, D), class names)`` from a file written by :func:`build_class_embeddings`.

    Read weights-only and checked: a 2-D finite floating-point matrix with one row per class name, built for
    ``class_names`` when those are given. Raises ``ValueError`` naming the file and what is wrong.
    """
    from recalx_lightning.checkpoints import read_weights_only

    stored = read_weights_only(path, "class-embedding file")
    where = f"class-embedding file {str(path)!r}"
    if not isinstance(stored, dict) or not {"embeddings", "class_names"} <= stored.keys():
        raise ValueError(
            f"{where} is not a class-embedding file (needs 'embeddings' (K, D) and 'class_names'); build one "
            "with `python -m recalx_lightning class-embeddings`."
        )
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
    if class_names is not None and list(names) != list(class_names):
        raise ValueError(
            f"{where} was built for {len(names)} other class names than the {len(class_names)} given; "
            "delete the file or point `class_embeddings_path` elsewhere."
        )
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
    pretrained: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
    batch_classes: int = 50,
) -> ZeroShotClassifier:
    """Build a zero-shot classifier from ``"<model>/<pretrained tag>"`` (e.g. ``"ViT-B-16-SigLIP/webli"``).

    Class embeddings, in order of precedence: ``class_embeddings`` (K, D); the file ``class_embeddings_path``
    if it exists (built once with ``python -m recalx_lightning class-embeddings``: then neither the tokenizer nor
    the text weights are needed); else computed from ``class_names`` × ``templates`` and saved to
    ``class_embeddings_path``. ``pretrained`` (a tag or a local weights file) overrides the tag in ``spec``;
    without any tag the model is randomly initialised (tests). ``tokenizer``: a local folder with Hugging Face
    tokenizer files (``tokenizer.json`` + ``tokenizer_config.json``, or ``spiece.model``) used instead of the
    one the model config names (SigLIP's is fetched from the hub).
    """
    import open_clip

    model_name, pretrained = _split_spec(spec, pretrained)
    if not templates or not all(isinstance(t, str) and "{}" in t for t in templates):
        raise ValueError("`templates` must be a non-empty list of strings with a '{}' for the class name.")
    names = read_class_names(class_names) if class_names is not None else None
    cache = Path(class_embeddings_path) if class_embeddings_path is not None else None
    if class_embeddings is None and cache is not None and cache.is_file():
        class_embeddings, names = load_class_embeddings(cache, names)
    if class_embeddings is None and names is None:
        if cache is not None:
            raise ValueError(
                f"class-embedding file `class_embeddings_path` {str(cache)!r} does not exist: build it with "
                f"`python -m recalx_lightning class-embeddings --model open_clip:{spec} --class_names imagenet "
                f"--output {cache}` (on a machine with the hub or a local --tokenizer), or pass `class_names`."
            )
        raise ValueError(
            "an open_clip zero-shot classifier needs `class_names` (a list, 'imagenet' or a file), "
            "`class_embeddings`, or an existing `class_embeddings_path`."
        )
    if class_embeddings is not None and names is not None and class_embeddings.shape[0] != len(names):
        raise ValueError(
            f"`class_embeddings` has {class_embeddings.shape[0]} rows but {len(names)} class names were given."
        )
    # the tokenizer first: it fails in a second, the weights may take minutes to load
    text_tokenizer = None if class_embeddings is not None else make_tokenizer(model_name, tokenizer, cache)
    clip, preprocess = _load_clip(model_name, pretrained, spec)
    if class_embeddings is None:
        class_embeddings = _encode_class_names(clip, text_tokenizer, names, templates, batch_classes)
        if cache is not None:
            save_class_embeddings(cache, class_embeddings, names, templates, model_name, pretrained)
    embed_dim = (open_clip.get_model_config(model_name) or {}).get("embed_dim")
    if embed_dim is not None and class_embeddings.shape[-1] != embed_dim:
        source = f"file {str(cache)!r}" if cache is not None and cache.is_file() else "`class_embeddings`"
        raise ValueError(
            f"class embeddings from {source} have dimension {class_embeddings.shape[-1]} but {model_name!r} embeds "
            f"images in {embed_dim}; rebuild them with `class-embeddings --model open_clip:{spec}`."
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


def build_class_embeddings(
    spec: str,
    class_names: Sequence[str] | str | os.PathLike,
    output: str | os.PathLike,
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    pretrained: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
    batch_classes: int = 50,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> Path:
    """Encode ``class_names`` × ``templates`` with the text tower of ``spec`` and save the (K, D) embeddings.

    The file (``{"embeddings", "class_names", "templates", "model", "pretrained"}``, loaded weights-only) is what
    ``class_embeddings_path`` reads: build it once where the hub (or a local ``tokenizer``) is available, then
    ``fit`` needs neither. ``device`` defaults to CUDA when available (1,000 classes × 6 templates of SigLIP-B/16
    take over an hour on a CPU). Returns the path written.
    """
    model_name, pretrained = _split_spec(spec.removeprefix("open_clip:"), pretrained)
    names = read_class_names(class_names)
    if not templates or not all(isinstance(t, str) and "{}" in t for t in templates):
        raise ValueError("`templates` must be a non-empty list of strings with a '{}' for the class name.")
    output = Path(output)
    if output.is_dir():
        raise ValueError(f"`output` {str(output)!r} is a directory; give a file name, e.g. {str(output / 'emb.pt')!r}.")
    text_tokenizer = make_tokenizer(model_name, tokenizer, None)
    clip, _ = _load_clip(model_name, pretrained, spec)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    embeddings = _encode_class_names(clip.to(device), text_tokenizer, names, templates, batch_classes, progress)
    save_class_embeddings(output, embeddings.cpu(), names, templates, model_name, pretrained)
    return output


def save_class_embeddings(path: Path, embeddings: Tensor, names, templates, model_name: str, pretrained) -> None:
    """Write a class-embedding file atomically (see :func:`build_class_embeddings`)."""
    _save_atomic(
        {
            "embeddings": embeddings.detach().float().cpu(),
            "class_names": list(names),
            "templates": list(templates),
            "model": model_name,
            "pretrained": None if pretrained is None else str(pretrained),
        },
        path,
    )


def make_tokenizer(model_name: str, tokenizer: str | os.PathLike | None = None, cache: Path | None = None):
    """open_clip's tokenizer for ``model_name``; with ``tokenizer`` (a local folder of Hugging Face tokenizer
    files, or a hub id) an ``HFTokenizer`` with the model's context length and text cleaning.

    Fails fast, in one message naming the fixes, when the tokenizer is not available offline.
    """
    import open_clip

    text_cfg = (open_clip.get_model_config(model_name) or {}).get("text_cfg", {})
    if tokenizer is not None and not Path(tokenizer).is_dir() and Path(tokenizer).is_absolute():
        raise ValueError(f"`tokenizer` {str(tokenizer)!r} is not a directory (expected tokenizer.json + "
                         "tokenizer_config.json or spiece.model).")
    try:
        with offline_if_unreachable():
            if tokenizer is None:
                return open_clip.get_tokenizer(model_name)
            from open_clip.tokenizer import HFTokenizer

            return HFTokenizer(
                str(tokenizer),
                context_length=text_cfg.get("context_length", 77),
                tokenizer_mode=text_cfg.get("tokenizer_mode"),
                **text_cfg.get("tokenizer_kwargs", {}),
            )
    except ImportError as err:
        raise ImportError(
            f"the tokenizer of {model_name!r} needs `{err.name or 'transformers'}`: pip install "
            "'recalx_lightning[siglip]' (or precompute the class embeddings elsewhere and pass "
            "`class_embeddings_path`)."
        ) from err
    except (OSError, ValueError, RuntimeError) as err:
        source = tokenizer or text_cfg.get("hf_tokenizer_name") or model_name
        missing = f"the class-embedding file {str(cache)!r} does not exist, so " if cache is not None else ""
        raise TokenizerUnavailableError(
            f"{missing}the text embeddings must be built, but the tokenizer {str(source)!r} cannot be loaded "
            f"(hub unreachable or offline, HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', 'unset')}). Fix: "
            "pass `tokenizer='/path/folder'` (tokenizer.json + tokenizer_config.json, e.g. from "
            f"`huggingface-cli download {source}`), or build the file once where the hub is reachable "
            "(`python -m recalx_lightning class-embeddings ... --output FILE`) and pass "
            f"`class_embeddings_path=FILE`. Original error: {type(err).__name__}: {' '.join(str(err).split())[:200]}"
        ) from err


class TokenizerUnavailableError(RuntimeError):
    """The text tokenizer of an open_clip model cannot be loaded (offline, not cached, no local folder)."""


def _split_spec(spec: str, pretrained: str | os.PathLike | None) -> tuple[str, str | None]:
    """``"<model>/<tag>"`` → (model name, weights: ``pretrained`` if given, else the tag or ``None``)."""
    import open_clip

    if spec.startswith(("hf-hub:", "local-dir:")):
        model_name, tag = spec, ""
    else:
        model_name, _, tag = spec.partition("/")
    if model_name not in open_clip.list_models() and not model_name.startswith(("hf-hub:", "local-dir:")):
        import difflib

        close = difflib.get_close_matches(model_name, open_clip.list_models(), n=5, cutoff=0.5)
        raise ValueError(f"unknown open_clip model {model_name!r}. Closest known: {close}.")
    pretrained = pretrained or tag or None
    if pretrained is not None and _looks_like_path(pretrained) and not Path(pretrained).is_file():
        raise ValueError(f"`pretrained` weights file {str(pretrained)!r} does not exist; point it at the "
                         "open_clip checkpoint (.bin/.pt/.safetensors) or use a pretrained tag.")
    return model_name, None if pretrained is None else str(pretrained)


def _looks_like_path(value: str | os.PathLike) -> bool:
    text = str(value)
    return isinstance(value, os.PathLike) or os.sep in text or text.endswith((".bin", ".pt", ".pth", ".safetensors"))


def _load_clip(model_name: str, pretrained: str | None, spec: str):
    import open_clip

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
    return clip.eval(), preprocess


def _encode_class_names(clip, tokenizer, names, templates, batch_classes: int, progress: bool = False) -> Tensor:
    """(K, D) normalised mean text embedding over templates of each class name (open_clip's classifier)."""
    import open_clip

    device = next(clip.parameters()).device
    with torch.no_grad():
        weights = open_clip.build_zero_shot_classifier(
            clip, tokenizer, names, list(templates), num_classes_per_batch=batch_classes, device=device,
            use_tqdm=progress,
        )
    return weights.T.contiguous()  # (D, K) → (K, D)
