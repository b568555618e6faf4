"""Backbones: one factory for timm, open_clip zero-shot, reference, imported and MLP classifiers.

create_model(name, **kwargs)      → nn.Module in eval mode, (n, *input_size) → logits (n, K)
model_info(model)                 → ModelInfo(num_classes, input_size, mean, std, patch_grid, ...)
create_transform(model)           → PIL → tensor preprocessing (timm / open_clip), or None
load_reference_model(name)        → project reference model, trained and cached on first use
"""

from recalx_lightning.models._hub import WeightsUnavailableError
from recalx_lightning.models.factory import DEFAULT_OPEN_CLIP, create_model, known_model_names
from recalx_lightning.models.info import (
    ModelInfo,
    check_model_data,
    create_transform,
    load_checked_state_dict,
    model_info,
    read_state_dict,
    set_model_info,
)
from recalx_lightning.models.modules import MLP, SmallCNN
from recalx_lightning.models.reference import (
    REFERENCE_MODELS,
    ReferenceSpec,
    default_cache_dir,
    load_reference_model,
    train_reference_model,
)
from recalx_lightning.models.zero_shot import DEFAULT_TEMPLATES, ZeroShotClassifier, read_class_names

__all__ = [
    "DEFAULT_OPEN_CLIP",
    "DEFAULT_TEMPLATES",
    "MLP",
    "REFERENCE_MODELS",
    "ModelInfo",
    "ReferenceSpec",
    "SmallCNN",
    "WeightsUnavailableError",
    "ZeroShotClassifier",
    "check_model_data",
    "create_model",
    "create_transform",
    "default_cache_dir",
    "known_model_names",
    "load_checked_state_dict",
    "load_reference_model",
    "model_info",
    "read_class_names",
    "read_state_dict",
    "set_model_info",
    "train_reference_model",
]
