"""What a model expects: class count, input size, normalisation and patch grid; checked weight loading.

``create_model`` attaches a :class:`ModelInfo` to every model it returns (attribute ``recalx_info``) and, where
one exists, the matching preprocessing (attribute ``recalx_transform``). The normalisation matters for
perturbations: a baseline defined in raw pixel space (black) is ``(0 - mean) / std`` in the model's input space.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

INFO_ATTR = "recalx_info"
TRANSFORM_ATTR = "recalx_transform"


@dataclass(frozen=True)
class ModelInfo:
    """Input/output contract of a classifier.

    Attributes:
        num_classes: K, the width of the logits (n, K).
        input_size: (C, H, W) for images, (F,) for tabular data.
        mean, std: per-channel normalisation applied to raw inputs in [0, 1] before the model (``None``: none,
            e.g. tabular data standardised by the dataset).
        patch_grid: (rows, cols) of a ViT's patch tokens, else ``None``.
        interpolation, crop_pct: resize settings of the model's preprocessing (images only).
        name: the spec the model was created from.
    """

    num_classes: int
    input_size: tuple[int, ...]
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    patch_grid: tuple[int, int] | None = None
    interpolation: str | None = None
    crop_pct: float | None = None
    name: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ModelInfo:
        def tup(v):
            return None if v is None else tuple(v)

        return cls(
            num_classes=int(values["num_classes"]),
            input_size=tuple(values["input_size"]),
            mean=tup(values.get("mean")),
            std=tup(values.get("std")),
            patch_grid=tup(values.get("patch_grid")),
            interpolation=values.get("interpolation"),
            crop_pct=values.get("crop_pct"),
            name=values.get("name"),
        )


def _timm_patch_grid(model: nn.Module) -> tuple[int, int] | None:
    for owner in (model, getattr(model, "trunk", None)):
        grid = getattr(getattr(owner, "patch_embed", None), "grid_size", None)
        if grid is not None:
            return tuple(int(g) for g in grid)
    return None


def timm_info(model: nn.Module, name: str | None = None) -> ModelInfo:
    """ModelInfo from timm's data config, with the input size the model was actually built for."""
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    input_size = tuple(cfg["input_size"])
    grid = _timm_patch_grid(model)
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None:
        input_size = (input_size[0], *(int(s) for s in img_size))
    in_chans = _first_conv_in_channels(model)
    if in_chans is not None:
        input_size = (in_chans, *input_size[1:])
    mean, std = tuple(cfg["mean"]), tuple(cfg["std"])
    if len(mean) != input_size[0]:  # in_chans != 3: timm keeps the RGB statistics; average them per channel
        mean = (sum(mean) / len(mean),) * input_size[0]
        std = (sum(std) / len(std),) * input_size[0]
    return ModelInfo(
        num_classes=int(getattr(model, "num_classes", 0) or 0),
        input_size=input_size,
        mean=mean,
        std=std,
        patch_grid=grid,
        interpolation=cfg.get("interpolation"),
        crop_pct=cfg.get("crop_pct"),
        name=name,
    )


def _first_conv_in_channels(model: nn.Module) -> int | None:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return int(module.in_channels)
    return None


def model_info(model: nn.Module) -> ModelInfo:
    """The :class:`ModelInfo` attached by ``create_model``; for other timm models, derived from timm's data config.

    Raises ``ValueError`` for a plain ``nn.Module`` without attached info (attach one with :func:`set_model_info`).
    """
    info = getattr(model, INFO_ATTR, None)
    if isinstance(info, ModelInfo):
        return info
    if getattr(model, "pretrained_cfg", None) is not None or getattr(model, "default_cfg", None) is not None:
        return timm_info(model)
    raise ValueError(
        f"no ModelInfo for {type(model).__name__}: create it with `recalx_lightning.models.create_model` or "
        "attach one with `set_model_info(model, ModelInfo(num_classes=..., input_size=...))`."
    )


def set_model_info(model: nn.Module, info: ModelInfo | Mapping[str, Any]) -> nn.Module:
    """Attach ``info`` (a ModelInfo or a dict of its fields) to ``model``; returns the model."""
    if not isinstance(info, ModelInfo):
        info = ModelInfo.from_dict(info)
    object.__setattr__(model, INFO_ATTR, info)
    return model


def create_transform(model: nn.Module) -> Callable | None:
    """Preprocessing PIL image → input tensor (C, H, W) matching ``model``.

    The transform attached by ``create_model`` (timm's or open_clip's eval transform), else one built from timm's
    data config, else ``None`` (tensor datasets: inputs are already preprocessed).
    """
    transform = getattr(model, TRANSFORM_ATTR, None)
    if transform is not None:
        return transform
    if getattr(model, "pretrained_cfg", None) is not None:
        from timm.data import create_transform as timm_transform
        from timm.data import resolve_data_config

        return timm_transform(**resolve_data_config({}, model=model))
    return None


def check_model_data(model: nn.Module, dataset: Any) -> None:
    """Raise ``ValueError`` when the dataset's class count or input size does not match the model."""
    info = model_info(model)
    k = getattr(dataset, "num_classes", None)
    if k is not None and info.num_classes and int(k) != info.num_classes:
        raise ValueError(
            f"class count mismatch: the dataset has {k} classes but the classifier outputs {info.num_classes} "
            "logits. Use a model trained for this dataset or pass the matching `num_classes`/`class_names`."
        )
    size = getattr(dataset, "input_size", None)
    if size is not None and tuple(size) != tuple(info.input_size):
        raise ValueError(
            f"input size mismatch: the dataset yields inputs of shape {tuple(size)} but the model expects "
            f"{tuple(info.input_size)}."
        )


# ------------------------------------------------------------------------------------------ weights
def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """A state dict from a ``.pt/.pth/.bin/.ckpt`` or ``.safetensors`` file; unwraps ``state_dict``/``model``
    containers (Lightning, timm training checkpoints) and strips a DDP ``module.`` prefix."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"weights file {str(path)!r} does not exist.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        from recalx_lightning.checkpoints import read_weights_only

        state = read_weights_only(path, "weights file")
    for key in ("state_dict", "model", "model_state_dict", "state_dict_ema"):
        if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping):
        raise ValueError(f"weights file {str(path)!r} does not hold a state dict (got {type(state).__name__}).")
    return {(k[7:] if k.startswith("module.") else k): v for k, v in state.items()}


def load_checked_state_dict(model: nn.Module, state: Mapping[str, Tensor] | str | os.PathLike) -> nn.Module:
    """Load weights strictly; on mismatch raise ``ValueError`` naming missing, unexpected and mis-shaped keys."""
    source = f" from {str(state)!r}" if isinstance(state, (str, os.PathLike)) else ""
    if isinstance(state, (str, os.PathLike)):
        state = read_state_dict(state)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:

        def head(items: list[str]) -> str:
            return ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")

        parts = [
            f"missing keys: {head(missing)}" if missing else "",
            f"unexpected keys: {head(unexpected)}" if unexpected else "",
            f"shape mismatches: {head(shapes)}" if shapes else "",
        ]
        raise ValueError(
            f"weights{source} do not match {type(model).__name__}: "
            + "; ".join(p for p in parts if p)
            + ". Check the architecture name and its arguments (e.g. num_classes, in_chans, img_size)."
        )
    model.load_state_dict(state, strict=True)
    return model
