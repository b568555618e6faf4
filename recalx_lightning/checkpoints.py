"""Loading ReCalX files safely: weights-only, and checked against the run that uses them.

Every checkpoint, calibrator and class-embedding file is read with ``torch.load(weights_only=True)`` through
:func:`read_weights_only` (tensors and plain containers only: a file never runs code). A ReCalX checkpoint
records what its temperatures were fitted for (:func:`fit_signature`: the model, the class count, the number of
bins and the perturbation); :func:`check_checkpoint` refuses it, naming both values, when the run differs.
``validate``, ``test`` (through :meth:`ReCalXModule.on_load_checkpoint`) and ``explain``
(:func:`restore_checkpoint`) share it.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

# Module arguments a checkpoint's temperatures depend on; a run using the checkpoint must agree on each.
FITTED_HPARAMS = ("model", "calibrator", "compare_calibrators", "num_bins", "min_temperature", "max_temperature")
SIGNATURE_KEY = "recalx_fit_signature"


def read_weights_only(path: str | Path, what: str, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with one-line errors naming ``what`` and the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist; check the path.")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        detail = str(err).partition("WeightsUnpickler error:")[2]
        reason = " ".join(detail.split("Check the documentation")[0].split())
        if "global" in reason.lower():
            raise ValueError(
                f"{what} {str(path)!r} holds Python objects, not only tensors, and is refused (files are loaded "
                f"weights-only and never run code): {reason.split('. ')[0][:160]}."
            ) from None
        raise ValueError(
            f"{what} {str(path)!r} is truncated or not a torch file ({reason[:120] or type(err).__name__}); "
            "re-create it."
        ) from None
    except (RuntimeError, OSError, EOFError, KeyError, ValueError, IndexError, AttributeError) as err:
        raise ValueError(
            f"{what} {str(path)!r} is truncated or not a torch file ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:160] if str(err) else ''}); re-create it."
        ) from None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a ReCalX Lightning checkpoint weights-only and check its structure (not yet against a run)."""
    checkpoint = read_weights_only(path, "checkpoint", map_location)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict) or not isinstance(
        checkpoint.get("hyper_parameters"), dict
    ):
        raise ValueError(
            f"checkpoint {str(path)!r} is not a ReCalX Lightning checkpoint (no state_dict/hyper_parameters); "
            "pass a checkpoint written by `fit` (<log_dir>/checkpoints/*.ckpt)."
        )
    missing = [k for k in ("calibrator", "num_bins") if k not in checkpoint["hyper_parameters"]]
    if missing:
        raise ValueError(
            f"checkpoint {str(path)!r} has no {missing} hyper-parameters: it was not written by a ReCalXModule."
        )
    return checkpoint


def hparam_mismatches(fitted: dict[str, Any], run: dict[str, Any]) -> list[str]:
    """``name: checkpoint X, this run Y`` for each of :data:`FITTED_HPARAMS` on which they differ."""
    out = []
    for name in FITTED_HPARAMS:
        if name in fitted and name in run and _normalise(fitted[name]) != _normalise(run[name]):
            out.append(f"model.{name}: checkpoint {fitted[name]!r}, this run {run[name]!r}")
    return out


def _normalise(value: Any) -> Any:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def data_signature(perturbation, data_hparams: Mapping[str, Any]) -> dict[str, Any]:
    """What the temperatures depend on from the data side: the feature layout, the baseline and the level."""
    mask = perturbation.feature_mask.cpu().contiguous()
    return {
        "num_features": int(perturbation.num_features),
        "feature_mask_shape": list(mask.shape),
        "feature_mask_sha1": hashlib.sha1(mask.numpy().tobytes()).hexdigest(),
        "baseline": repr((data_hparams.get("baseline"), data_hparams.get("baseline_kwargs"),
                          data_hparams.get("baseline_space"))),
        "level": str(data_hparams.get("level", "paper")),
    }


def fit_signature(module) -> dict[str, Any]:
    """What the module's temperatures are fitted for beyond its hyper-parameters: the class count and, once
    the module is connected to its data, :func:`data_signature`."""
    return {"num_classes": int(module.model_info.num_classes), **(module.data_signature or {})}


def check_checkpoint(checkpoint: dict[str, Any], module, path: str | Path | None = None) -> None:
    """Refuse a checkpoint fitted for another model, class count, bin count or perturbation than this run's
    (the perturbation is checked once the module is connected to its data).

    Also requires the calibrators' temperatures to be present, of the right shape and finite.
    """
    where = f"checkpoint {str(path)!r}" if path else "the checkpoint"
    problems = hparam_mismatches(checkpoint.get("hyper_parameters", {}), dict(module.hparams))
    stored = checkpoint.get(SIGNATURE_KEY)
    info = checkpoint.get("model_info") or {}
    if stored is None and "num_classes" in info:
        stored = {"num_classes": info["num_classes"]}
    if stored is not None:
        current = fit_signature(module)
        for key, value in stored.items():
            if key not in current or current[key] == value:
                continue
            if key == "feature_mask_sha1":
                problems.append("data: another feature layout (feature mask) than this run's")
            else:
                problems.append(f"{key}: checkpoint {value!r}, this run {current[key]!r}")
    if problems:
        raise ValueError(
            f"{where} was fitted for another setup ({'; '.join(problems)}); use the checkpoint's settings for "
            "model and data (its config.yaml) or refit."
        )
    state = checkpoint["state_dict"]
    for kind, calibrator in module.calibrators.items():
        key = f"calibrators.{kind}.log_temperature"
        if key not in state:
            raise ValueError(f"{where} holds no temperatures for calibrator {kind!r} ({key}); refit.")
        values = state[key]
        if not isinstance(values, torch.Tensor) or tuple(values.shape) != (calibrator.num_bins,):
            shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
            raise ValueError(f"{where}: {key} has shape {shape}, expected ({calibrator.num_bins},); refit.")
        if not torch.isfinite(values).all():
            raise ValueError(f"{where}: {key} holds non-finite temperatures; refit.")


def restore_checkpoint(module, path: str | Path) -> dict[str, Any]:
    """Load ``path`` into ``module`` after checking it against the run (connect the module to its data first,
    so that the perturbation is checked too)."""
    checkpoint = load_checkpoint(path)
    check_checkpoint(checkpoint, module, path)
    module.on_load_checkpoint(checkpoint, checked=True)
    module.load_state_dict(checkpoint["state_dict"])
    return checkpoint
