"""The core imports without Lightning, torchmetrics or matplotlib; the Lightning names still resolve from the top level.

Imports are checked in fresh interpreters, so modules other tests imported do not leak in.
"""

import importlib
import subprocess
import sys

import pytest

import recalx_lightning


def _modules_after(code: str) -> set[str]:
    script = code + "\nimport sys\nprint(' '.join(sys.modules))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return set(result.stdout.split())


@pytest.mark.parametrize(
    "code",
    [
        "import recalx_lightning",
        "import recalx_lightning.perturbation",
        "from recalx_lightning import calibrate, Perturbation, BinnedTemperature, fit_temperatures,"
        " kl_calibration_error, evaluate_calibrators, RecalibratedClassifier, explain, explain_dataset, make_dataset,"
        " create_model",
    ],
)
def test_core_imports_without_lightning(code):
    loaded = _modules_after(code)
    assert not {m for m in loaded if m == "lightning" or m.startswith(("lightning.", "pytorch_lightning"))}
    assert "torchmetrics" not in loaded and "matplotlib" not in loaded


def test_lightning_names_resolve_from_the_top_level():
    from recalx_lightning.lightning import ExplanationQualityCallback, PerturbationDataModule, ReCalXModule

    assert recalx_lightning.ReCalXModule is ReCalXModule
    assert recalx_lightning.PerturbationDataModule is PerturbationDataModule
    assert recalx_lightning.ExplanationQualityCallback is ExplanationQualityCallback
    assert {"ReCalXModule", "ReCalXTrainer"} <= set(dir(recalx_lightning))


def test_public_names_are_few_sorted_and_all_resolve():
    names = recalx_lightning.__all__
    assert names == sorted(names) and len(names) <= 26
    assert set(names) == {*recalx_lightning._PUBLIC, *recalx_lightning._LIGHTNING}
    for name in names:
        assert getattr(recalx_lightning, name) is not None


@pytest.mark.parametrize("old", ["module", "datamodule", "callbacks", "trainer", "cli"])
def test_old_module_paths_alias_the_new_ones(old):
    new = importlib.import_module(f"recalx_lightning.lightning.{old}")
    with pytest.warns(DeprecationWarning, match=f"recalx_lightning.lightning.{old}"):
        alias = importlib.reload(importlib.import_module(f"recalx_lightning.{old}"))
    public = [
        name
        for name, value in vars(new).items()
        if not name.startswith("_") and getattr(value, "__module__", None) == new.__name__
    ]
    assert public and all(getattr(alias, name) is getattr(new, name) for name in public)


def test_internal_names_still_resolve_with_a_warning():
    from recalx_lightning.perturbation import subset_generator

    with pytest.warns(DeprecationWarning, match="recalx_lightning.perturbation"):
        assert recalx_lightning.subset_generator is subset_generator


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        recalx_lightning.nope  # noqa: B018
