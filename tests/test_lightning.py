"""ReCalXModule + PerturbationDataModule + CLI: forwards counted, temperatures vs an independent fit, DDP."""

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from recalx_lightning import PerturbationDataModule, ReCalXModule, fit_temperatures, load_calibrator

ROOT = Path(__file__).resolve().parents[1]
MLP = {"in_features": 13, "num_classes": 3, "hidden_sizes": [16]}


def small_data(**overrides):
    kwargs = dict(dataset="wine", split="train", features="tabular", num_bins=5, subsets_per_bin=4,
                  num_calibration_samples=12, num_eval_samples=10, eval_subsets_per_bin=6, batch_size=5, seed=3)
    kwargs.update(overrides)
    return PerturbationDataModule(**kwargs)


def small_module(**overrides):
    kwargs = dict(model="mlp", model_kwargs=MLP, num_bins=5)
    kwargs.update(overrides)
    torch.manual_seed(0)
    return ReCalXModule(**kwargs)


def trainer(tmp_path, **kwargs):
    return L.Trainer(max_epochs=1, num_sanity_val_steps=0, default_root_dir=tmp_path, enable_progress_bar=False,
                     logger=L.pytorch.loggers.TensorBoardLogger(tmp_path, name="run"), **kwargs)


def independent_cache(module, datamodule):
    """Every perturbed calibration sample evaluated one image at a time, outside Lightning."""
    dataset = datamodule.datasets["calibration"]
    logits, labels, levels, clean = [], [], [], []
    for i in range(len(dataset)):
        x, y, keep, _ = dataset[i]
        with torch.no_grad():
            logits.append(module.model(datamodule.perturbation.apply(x[None], keep)))
            clean.append(module.model(x[None]))
        labels.append(y.repeat(keep.shape[0]))
        levels.append(datamodule.perturbation.level(keep))
    return torch.cat(logits), torch.cat(labels), torch.cat(levels), torch.cat(clean)


def test_fit_runs_backbone_once_per_sample_and_matches_an_independent_fit(tmp_path):
    module, datamodule = small_module(), small_data()
    run = trainer(tmp_path)
    run.fit(module, datamodule)
    n, per_image = 12, 5 * 4
    assert module.backbone_forwards - 10 * 5 * 6 == n * per_image + n  # + one clean forward per image (global)
    logits, labels, levels, clean = independent_cache(module, datamodule)
    expected = fit_temperatures(logits, labels, levels, "binned", num_bins=5).calibrator
    assert torch.allclose(module.calibrators["binned"].log_temperature, expected.log_temperature, atol=1e-6)
    expected_global = fit_temperatures(clean, labels[::per_image], None, "global").calibrator
    assert torch.allclose(module.calibrators["global"].log_temperature, expected_global.log_temperature, atol=1e-6)
    log_dir = Path(run.log_dir)
    report = json.loads((log_dir / "calibration_report.json").read_text())
    text = json.dumps(report)
    for kind in ("uncalibrated", "global", "binned", "smooth"):
        assert kind in text
    assert (log_dir / "calibration_report.md").exists()
    assert list(log_dir.glob("calibration_report*.png"))
    assert load_calibrator(log_dir / "calibrator.pt").temperatures.tolist() == module.calibrator.temperatures.tolist()
    assert json.loads((log_dir / "fit_diagnostics.json").read_text())["binned"]["converged"]


def test_checkpoint_holds_temperatures_and_reloads_without_backbone_weights(tmp_path):
    module, datamodule = small_module(compare_calibrators=False), small_data()
    run = trainer(tmp_path)
    run.fit(module, datamodule)
    checkpoint_path = next(Path(run.log_dir).rglob("*.ckpt"))
    state = torch.load(checkpoint_path, weights_only=True)["state_dict"]
    assert "calibrators.binned.log_temperature" in state and not any(k.startswith("model.") for k in state)
    torch.manual_seed(123)  # a different random MLP: the checkpoint's temperatures must still come back
    reloaded = ReCalXModule.load_from_checkpoint(checkpoint_path)
    assert torch.equal(reloaded.calibrator.log_temperature, module.calibrator.log_temperature)
    assert bool(reloaded.fitted)


def test_train_mode_keeps_backbone_frozen():
    module = ReCalXModule(model="mlp", model_kwargs={**MLP, "dropout": 0.5}, num_bins=5)
    module.train()
    assert not module.model.training
    assert not any(p.requires_grad for p in module.model.parameters())


def run_cli(args, tmp_path, env_extra=None, timeout=240):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "0", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "recalx_lightning", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)


TABULAR_ARGS = [
    "--config", str(ROOT / "configs" / "tabular.yaml"),
    "--model.init_args.model", "mlp", "--model.init_args.model_kwargs", json.dumps({**MLP, "in_features": 30,
                                                                                     "num_classes": 2}),
    "--data.init_args.num_calibration_samples", "10", "--data.init_args.num_eval_samples", "8",
    "--data.init_args.subsets_per_bin", "3", "--data.init_args.eval_subsets_per_bin", "3",
    "--data.init_args.batch_size", "3", "--trainer.enable_progress_bar", "false",
]


@pytest.mark.parametrize("level", ["paper", "effective"])
def test_ddp_two_processes_equal_one(tmp_path, level):
    """Same temperatures with 1 and 2 CPU processes (gloo), ≤ 1e-6, at either level definition."""
    temperatures = []
    for devices, strategy in ((1, "auto"), (2, "ddp")):
        out = tmp_path / f"d{devices}"
        out.mkdir()
        result = run_cli(["fit", *TABULAR_ARGS, "--data.init_args.level", level, "--trainer.devices", str(devices),
                          "--trainer.strategy", strategy], out)
        assert result.returncode == 0, result.stderr[-3000:]
        temperatures.append(load_calibrator(next(out.rglob("calibrator.pt"))).log_temperature)
    assert torch.allclose(temperatures[0], temperatures[1], atol=1e-6)


def test_cli_validate_from_checkpoint(tmp_path):
    assert run_cli(["fit", *TABULAR_ARGS], tmp_path).returncode == 0
    checkpoint = next(tmp_path.rglob("*.ckpt"))
    result = run_cli(["validate", *TABULAR_ARGS, "--ckpt_path", str(checkpoint)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "val/" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model.init_args.model", "timm:resnet5O"], "unknown"),
        (["--data.init_args.num_bins", "0"], "num_bins"),
        (["--model.init_args.num_bins", "4"], "model num_bins = 4 but data.init_args.num_bins = 10"),
        (["--data.init_args.dataset", "imagenet", "--data.init_args.dataset_kwargs",
          '{"root": "/nonexistent/val", "class_index": "/nonexistent/map.txt"}'], "does not exist"),
    ],
)
def test_bad_configs_fail_clearly_and_leave_no_run_directory(tmp_path, args, message):
    result = run_cli(["fit", *TABULAR_ARGS, *args], tmp_path)
    assert result.returncode != 0
    assert message in result.stderr
    assert not list(tmp_path.rglob("version_*")), "a failed run must not leave a log directory"


def test_module_and_data_are_connected_once_with_or_without_a_trainer(tmp_path):
    """The data hands its perturbation and level to the module, the module its info to the data, in one call."""
    from recalx_lightning.lightning import connect

    module, data = small_module(), small_data()
    with pytest.raises(RuntimeError, match="not connected"):
        _ = module.perturbation
    connect(module, data)
    assert module.perturbation is data.perturbation and module.level == "paper"
    assert data.model_info == module.model_info
    assert module.data_signature["num_features"] == 13
    fitted, fitted_data = small_module(), small_data()
    trainer(tmp_path).fit(fitted, fitted_data)  # a plain Lightning Trainer connects through the data's setup
    assert fitted.perturbation is fitted_data.perturbation and bool(fitted.fitted)
    with pytest.raises(ValueError, match=r"model.num_bins = 4 but data.num_bins = 5; set num_bins once"):
        connect(small_module(num_bins=4), small_data())


def test_class_count_mismatch_is_caught_before_any_forward(tmp_path):
    module = small_module(model_kwargs={**MLP, "num_classes": 2})
    with pytest.raises(ValueError, match="3 classes but the classifier"):
        trainer(tmp_path).fit(module, small_data())
    assert module.backbone_forwards == 0


def test_digits_default_config_end_to_end_with_explanations(tmp_path):
    """The README's main job on the embedded default (reduced sizes), then `explain` from its checkpoint."""
    cache = {"RECALX_CACHE": str(tmp_path / "cache")}
    small = ["--data.init_args.num_calibration_samples", "20", "--data.init_args.num_eval_samples", "12",
             "--data.init_args.eval_subsets_per_bin", "4", "--trainer.enable_progress_bar", "false"]
    config = ["--config", str(ROOT / "configs" / "digits.yaml")]
    result = run_cli(["fit", *config, *small, "--trainer.callbacks.init_args.num_images", "4",
                      "--trainer.callbacks.init_args.num_samples", "3"], tmp_path, cache)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "logs" / "digits" / "version_0"
    quality = json.loads((run_dir / "explanation_quality.json").read_text())
    assert set(quality["summary"]) == {"uncalibrated/plain", "binned/plain", "binned/consistent"}
    assert "localization" in quality["summary"]["binned/consistent"]
    assert (run_dir / "explanation_quality_heatmaps.png").exists()
    checkpoint = next(run_dir.rglob("*.ckpt"))
    # the config the run saved works as is for `explain`
    result = run_cli(["explain", "--config", str(run_dir / "config.yaml"), "--ckpt_path", str(checkpoint),
                      "--indices", "[0, 1]", "--num_samples", "3", "--output_dir", str(tmp_path / "explained")],
                     tmp_path, cache)
    assert result.returncode == 0, result.stderr[-3000:]
    attributions = torch.load(tmp_path / "explained" / "attributions.pt", weights_only=True)
    assert attributions["binned/consistent"].shape == (2, 64)  # 8 × 8 patches of 4 × 4 pixels
    written = json.loads((tmp_path / "explained" / "explanations.json").read_text())
    assert written["indices"] == [0, 1] and "localization" in written["metrics"]["binned/consistent"]
    assert (tmp_path / "explained" / "explanations_heatmaps.png").exists()
    assert sorted(p.name for p in (tmp_path / "logs" / "digits").iterdir()) == ["version_0"]  # no new run dir


def test_missing_imagenet_path_fails_in_one_line_before_the_backbone_is_built(tmp_path):
    result = run_cli(["fit", "--config", str(ROOT / "configs" / "vit.yaml")], tmp_path)
    assert result.returncode == 2
    assert "`data.dataset_kwargs.root` is required" in result.stderr
    assert "Traceback" not in result.stderr and "huggingface" not in result.stderr


def test_feature_count_mismatch_is_named(tmp_path):
    args = ["--model.init_args.model_kwargs", json.dumps({"in_features": 12, "num_classes": 2})]
    result = run_cli(["fit", *TABULAR_ARGS, *args], tmp_path)
    assert result.returncode != 0 and "input size mismatch" in result.stderr
    assert not list(tmp_path.rglob("version_*"))


def test_load_calibrator_reads_a_checkpoint_and_rejects_other_files(tmp_path):
    module, datamodule = small_module(), small_data()
    run = trainer(tmp_path)
    run.fit(module, datamodule)
    loaded = load_calibrator(next(Path(run.log_dir).rglob("*.ckpt")))
    assert torch.equal(loaded.log_temperature, module.calibrator.log_temperature)
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="neither a calibrator file"):
        load_calibrator(tmp_path / "other.pt")


def test_a_model_that_outputs_nan_fails_at_the_first_batch_before_any_fit(tmp_path):
    module, datamodule = small_module(), small_data()
    with torch.no_grad():
        next(module.model.parameters()).fill_(float("nan"))
    with pytest.raises(ValueError, match="model logits on perturbed inputs.*non-finite.*BatchNorm"):
        trainer(tmp_path).fit(module, datamodule)
    assert module.backbone_forwards <= 5 * 5 * 4 + 5  # one batch of 5 images (and their clean forwards)
    assert not bool(module.fitted)


def test_a_data_module_set_up_for_one_model_refuses_another_preprocessing():
    from recalx_lightning.lightning import connect
    from recalx_lightning.models import ModelInfo

    data = small_data()
    connect(small_module(), data)
    connect(small_module(), data)  # another module of the same model: same perturbation, accepted
    with pytest.raises(ValueError, match="other preprocessing"):
        data.use_model(ModelInfo(num_classes=3, input_size=(13,), mean=(0.5,), std=(0.2,)))


def test_report_options_reach_the_report_and_are_checked_up_front(tmp_path):
    module = small_module(report_options={"kl_variants": ["top_label"], "floor_resamples": 0, "se_subsamples": 0})
    trainer(tmp_path).fit(module, small_data())
    rows = module.last_report.rows["binned"]
    assert all(row.kl_ce != row.kl_ce for row in rows)  # canonical not computed: NaN
    assert all(row.kl_ce_top_label == row.kl_ce_top_label for row in rows)
    assert all(row.kl_ce_top_label_floor != row.kl_ce_top_label_floor for row in rows)  # no floor asked for
    with pytest.raises(ValueError, match=r"`report_options.kl_variants` must be a non-empty subset"):
        small_module(report_options={"kl_variants": ["canonicl"]})
    with pytest.raises(ValueError, match=r"`report_options` has unknown keys \['floors'\]"):
        small_module(report_options={"floors": 2})
