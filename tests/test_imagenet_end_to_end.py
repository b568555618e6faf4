"""End to end through the CLI as a user runs the ImageNet configs: a fake ImageNet (JPEGs + boxes, built here), a
tiny random timm ViT (patch grid 4 × 4 = 16 features) saved to a local weights file and loaded through
``model_kwargs.pretrained_file``, ``fit`` then ``explain`` with ``configs/vit.yaml``, TensorBoard tags checked."""

import json
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from recalx_lightning.lightning.cli import main
from tests.fake_imagenet import build_fake_imagenet

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "vit.yaml"
CLASSES = 4


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["recalx"])


def tensorboard_tags(log_dir: Path) -> dict[str, list[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return accumulator.Tags()


def test_vit_config_fit_then_explain_on_fake_imagenet(tmp_path, capsys):
    data = build_fake_imagenet(tmp_path / "imagenet", num_images=24, num_classes=CLASSES, labelled_classes=CLASSES,
                               size=(80, 64))
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=2, num_classes=CLASSES)
    weights = tmp_path / "vit_tiny_random.safetensors"
    save_file(vit.state_dict(), str(weights))
    common = [
        "--config", str(CONFIG),
        "--model.init_args.model", "timm:vit_tiny_patch16_224",
        "--model.init_args.model_kwargs.pretrained_file", str(weights),
        "--model.init_args.model_kwargs.img_size", "64",
        "--model.init_args.model_kwargs.depth", "2",
        "--model.init_args.model_kwargs.num_classes", str(CLASSES),
        "--data.init_args.dataset_kwargs.root", str(data["root"]),
        "--data.init_args.dataset_kwargs.class_index", str(data["class_index"]),
        "--data.init_args.dataset_kwargs.loc_solution", str(data["loc_solution"]),
        "--data.init_args.num_calibration_samples", "12",
        "--data.init_args.num_eval_samples", "12",
        "--data.init_args.subsets_per_bin", "3",
        "--data.init_args.eval_subsets_per_bin", "3",
        "--data.init_args.batch_size", "4",
        "--trainer.accelerator", "cpu",
        "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"),
    ]
    main(["fit", *common])
    run = tmp_path / "logs" / "vit" / "version_0"
    diagnostics = json.loads((run / "fit_diagnostics.json").read_text())
    assert len(diagnostics["binned"]["temperatures"]) == 10
    (checkpoint,) = (run / "checkpoints").glob("*.ckpt")

    tags = tensorboard_tags(run)
    scalars = set(tags["scalars"])
    for kind in ("binned", "smooth"):
        assert {f"temperature/{kind}/bin_{b}" for b in range(10)} <= scalars
    assert "temperature/global/bin_0" in scalars
    for name in ("uncalibrated", "binned", "smooth", "global"):
        assert {f"val/{name}/{m}/bin_{b}" for m in ("kl_ce", "ece", "nll", "accuracy") for b in range(10)} <= scalars
        assert f"val/{name}/kl_ce_max" in scalars
    assert {"val/calibration_error_vs_level", "val/reliability"} <= set(tags["images"])

    capsys.readouterr()
    main(["explain", *common, "--ckpt_path", str(checkpoint), "--indices", "[0, 1, 2]", "--num_samples", "2",
          "--output_dir", str(tmp_path / "explained")])
    result = json.loads((tmp_path / "explained" / "explanations.json").read_text())
    attributions = torch.load(tmp_path / "explained" / "attributions.pt", weights_only=True)
    assert attributions["indices"].tolist() == [0, 1, 2]
    # boxes from LOC_val_solution.csv reach the explanation metrics
    assert "localization" in result["summary"]["binned/plain"]
    assert attributions["binned/plain"].shape == (3, 16)  # the ViT's 4 × 4 patch grid


def test_worker_count_fits_the_machine(tmp_path):
    import os

    from recalx_lightning import PerturbationDataModule

    data = build_fake_imagenet(tmp_path / "imagenet", num_images=2, num_classes=CLASSES)
    assert PerturbationDataModule(dataset="digits").resolved_num_workers() == 0  # in memory: no workers
    folders = PerturbationDataModule(dataset="imagenet", dataset_kwargs={"root": str(data["root"]),
                                                                         "class_index": str(data["class_index"])})
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert 1 <= folders.resolved_num_workers() <= min(8, max(1, cpus - 1))
    assert PerturbationDataModule(dataset="digits", num_workers=3).resolved_num_workers() == 3
