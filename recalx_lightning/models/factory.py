"""One entry point for every classifier: ``create_model(name, **kwargs)``, names like timm's.

Name schemes:

=================================  ============================================================================
``timm:<name>`` or ``<name>``      any timm model (``resnet50``, ``vit_base_patch16_224.augreg_in21k``); also
                                   ``hf-hub:<repo>`` and ``local-dir:/path`` (passed through to timm)
``open_clip:<model>/<tag>``        zero-shot classifier, e.g. ``open_clip:ViT-B-16-SigLIP/webli``
``reference:<name>``               a project reference model (trained on first use and cached)
``import:<module.path:Class>``     any ``nn.Module`` class by import path, ``init_args`` + ``checkpoint_path``;
                                   imports and runs code, so refused unless ``RECALX_ALLOW_IMPORT=1``
``mlp``                            :class:`~recalx_lightning.models.modules.MLP` for tabular data
=================================  ============================================================================

The returned module is in eval mode, maps a preprocessed batch to logits (n, K), and carries its
:class:`ModelInfo` (``model_info(model)``) and, for timm/open_clip, its preprocessing (``create_transform``).
"""

from __future__ import annotations

import difflib
import importlib
import os
from collections.abc import Mapping
from typing import Any

from torch import nn

from recalx_lightning.models._hub import is_hub_error, offline_if_unreachable, weights_error
from recalx_lightning.models.info import (
    TRANSFORM_ATTR,
    ModelInfo,
    load_checked_state_dict,
    read_state_dict,
    set_model_info,
    timm_info,
)
from recalx_lightning.models.modules import MLP
from recalx_lightning.models.reference import REFERENCE_MODELS, load_reference_model

ALLOW_IMPORT_ENV = "RECALX_ALLOW_IMPORT"
SCHEMES = ("timm", "open_clip", "reference", "import", "mlp")
DEFAULT_OPEN_CLIP = "open_clip:ViT-B-16-SigLIP/webli"


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Create a classifier by name (see the module docstring for the schemes); returned in eval mode.

    timm kwargs: ``pretrained=True``, ``checkpoint_path`` (exact weights for this architecture, checked key by
    key), ``pretrained_file`` (pretrained weights from a local file, adapted by timm like hub weights, e.g. a new
    ``num_classes``), ``local_dir`` (a folder with ``config.json`` and weights), ``num_classes`` and any other
    ``timm.create_model`` argument.

    open_clip kwargs: ``class_names`` (list, ``"imagenet"`` or file), ``templates``, ``class_embeddings``
    (precomputed (K, D)), ``class_embeddings_path`` (loaded if it exists, else computed and saved; build it with
    ``python -m recalx_lightning class-embeddings``), ``pretrained`` (tag or local file), ``tokenizer`` (local
    folder of Hugging Face tokenizer files).

    reference kwargs: ``cache_dir``, ``train_if_missing=True``. import kwargs: ``init_args`` (dict),
    ``checkpoint_path``, ``info`` (ModelInfo or dict). mlp kwargs: ``in_features``, ``num_classes``,
    ``hidden_sizes``, ``dropout``, ``checkpoint_path``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"`name` must be a non-empty model name string, got {name!r}.")
    scheme, _, rest = name.partition(":")
    if scheme in ("hf-hub", "local-dir"):
        scheme, rest = "timm", name
    elif not rest:
        scheme, rest = ("mlp", "") if name == "mlp" else ("timm", name)
    if scheme == "timm":
        model, info, transform = _create_timm(rest, **kwargs)
    elif scheme == "open_clip":
        from recalx_lightning.models.zero_shot import create_open_clip_classifier

        return create_open_clip_classifier(rest, **kwargs)
    elif scheme == "reference":
        return load_reference_model(rest, **kwargs)
    elif scheme == "import":
        if os.environ.get(ALLOW_IMPORT_ENV) != "1":
            raise ValueError(
                f"model spec {name!r} would import and run code named by the config; it is refused unless you "
                f"trust this config: set the environment variable {ALLOW_IMPORT_ENV}=1 to allow `import:` specs."
            )
        model, info, transform = _create_import(rest, **kwargs)
    elif scheme == "mlp":
        model, info, transform = _create_mlp(**kwargs)
    else:
        raise ValueError(f"unknown model scheme {scheme!r} in {name!r}; use one of {list(SCHEMES)}.")
    set_model_info(model, info)
    if transform is not None:
        object.__setattr__(model, TRANSFORM_ATTR, transform)
    return model.eval()


def known_model_names() -> list[str]:
    """Names that ``create_model`` accepts without a scheme-specific argument (for suggestions)."""
    import timm

    return [*timm.list_models(), *(f"reference:{n}" for n in REFERENCE_MODELS), "mlp", DEFAULT_OPEN_CLIP]


def _unknown_name(name: str) -> ValueError:
    close = difflib.get_close_matches(name, known_model_names(), n=5, cutoff=0.5)
    hint = f" Closest known names: {close}." if close else ""
    return ValueError(
        f"unknown model name {name!r}.{hint} Use a timm name (timm.list_models()), 'open_clip:<model>/<tag>', "
        "'reference:<name>', 'import:<module:Class>' or 'mlp'."
    )


def _create_timm(
    name: str,
    pretrained: bool = True,
    checkpoint_path: str | os.PathLike | None = None,
    pretrained_file: str | os.PathLike | None = None,
    local_dir: str | os.PathLike | None = None,
    **timm_kwargs: Any,
) -> tuple[nn.Module, ModelInfo, Any]:
    import timm
    from timm.data import create_transform, resolve_data_config

    if local_dir is not None:
        if not os.path.isdir(local_dir):
            raise ValueError(f"`local_dir` {str(local_dir)!r} is not a directory (expected config.json + weights).")
        name = f"local-dir:{local_dir}"
    if not name.startswith(("hf-hub:", "local-dir:")) and not timm.is_model(name):
        raise _unknown_name(name)
    if pretrained_file is not None:
        if not os.path.isfile(pretrained_file):
            raise ValueError(f"`pretrained_file` {str(pretrained_file)!r} does not exist.")
        overlay = {**timm_kwargs.get("pretrained_cfg_overlay", {}), "file": str(pretrained_file)}
        if not str(pretrained_file).endswith(".npz"):
            overlay["custom_load"] = False  # timm's custom loaders read only big_vision .npz files
            file_classes = _file_num_classes(name, pretrained_file)
            if file_classes is not None:
                overlay["num_classes"] = file_classes  # timm then keeps the file's head when K matches
        timm_kwargs["pretrained_cfg_overlay"] = overlay
        pretrained = True
    if checkpoint_path is not None:
        pretrained = False  # the checkpoint replaces every weight; never touch the hub
    try:
        with offline_if_unreachable(enabled=pretrained):
            model = timm.create_model(name, pretrained=pretrained, **timm_kwargs)
    except RuntimeError as err:
        if pretrained_file is not None and ("size mismatch" in str(err) or "key" in str(err).lower()):
            raise ValueError(f"`pretrained_file` does not match {name!r}: {err}") from err
        if pretrained and is_hub_error(err):
            raise _timm_weights_error(name, err) from err
        raise
    except OSError as err:
        if pretrained and is_hub_error(err):
            raise _timm_weights_error(name, err) from err
        raise
    if checkpoint_path is not None:
        load_checked_state_dict(model, checkpoint_path)
    info = timm_info(model, name=f"timm:{name}")
    config = resolve_data_config({"input_size": info.input_size}, model=model)
    return model, info, create_transform(**config)


def _file_num_classes(name: str, path: str | os.PathLike) -> int | None:
    """Rows of the classifier weight stored in a weights file, if the model's classifier key is known."""
    import timm

    cfg = timm.models.get_pretrained_cfg(name.partition(".")[0]) if timm.is_model(name) else None
    classifier = getattr(cfg, "classifier", None)
    if not isinstance(classifier, str):
        return None
    weight = read_state_dict(path).get(f"{classifier}.weight")
    return int(weight.shape[0]) if weight is not None and weight.ndim >= 1 else None


def _timm_weights_error(name: str, err: BaseException):
    return weights_error(
        f"timm:{name}",
        err,
        "Point at local weights instead: create_model(name, pretrained_file='/path/model.safetensors') "
        "(pretrained weights, adapted to num_classes), checkpoint_path='/path/weights.pth' (exact weights), "
        "local_dir='/path/folder' or the name 'local-dir:/path/folder' (config.json + weights), or "
        "pretrained=False for random initialisation.",
    )


def _create_import(
    target: str,
    init_args: Mapping[str, Any] | None = None,
    checkpoint_path: str | os.PathLike | None = None,
    info: ModelInfo | Mapping[str, Any] | None = None,
) -> tuple[nn.Module, ModelInfo, Any]:
    module_name, sep, attr = target.partition(":")
    if not sep:
        module_name, _, attr = target.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"`import:` needs 'package.module:ClassName', got {target!r}.")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import {attr!r} from {module_name!r} ({err}); check the import path.") from err
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise ValueError(f"'import:{target}' is a {type(obj).__name__}, not a torch.nn.Module class; only model "
                         "classes are built.")
    model = obj(**dict(init_args or {}))
    if not isinstance(model, nn.Module):
        raise ValueError(f"{target!r} built a {type(model).__name__}, not a torch.nn.Module.")
    if checkpoint_path is not None:
        load_checked_state_dict(model, checkpoint_path)
    if info is None:
        k = getattr(model, "num_classes", None)
        size = getattr(model, "input_size", None)
        if k is None or size is None:
            raise ValueError(
                f"pass `info=dict(num_classes=..., input_size=(C, H, W) or (F,), mean=..., std=...)` for "
                f"{target!r}: the model has no `num_classes`/`input_size` attributes to read them from."
            )
        info = ModelInfo(num_classes=int(k), input_size=tuple(size))
    info = info if isinstance(info, ModelInfo) else ModelInfo.from_dict(info)
    return model, info, None


def _create_mlp(
    in_features: int | None = None,
    num_classes: int | None = None,
    hidden_sizes: tuple[int, ...] = (64, 64),
    dropout: float = 0.0,
    checkpoint_path: str | os.PathLike | None = None,
) -> tuple[nn.Module, ModelInfo, Any]:
    if in_features is None or num_classes is None:
        raise ValueError("'mlp' needs `in_features` (number of input features) and `num_classes`.")
    model = MLP(in_features, num_classes, tuple(hidden_sizes), dropout)
    if checkpoint_path is not None:
        load_checked_state_dict(model, checkpoint_path)
    return model, ModelInfo(num_classes=num_classes, input_size=(in_features,), name="mlp"), None
