"""`explain` over a split: 1 vs 2 DDP processes bit for bit, kill -9 and resume, bad input before any evaluation."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from recalx_lightning import Perturbation, PerturbationDataModule, ReCalXModule
from recalx_lightning.lightning.trainer import ReCalXTrainer

ROOT = Path(__file__).resolve().parents[1]
DATA = dict(dataset="digits", split="val", features="patches", patch_size=4, baseline="zeros", num_bins=10,
            subsets_per_bin=10, num_calibration_samples=20, num_eval_samples=25, eval_subsets_per_bin=2,
            batch_size=4, seed=0)
CLI_DATA = ["--config", str(ROOT / "configs" / "digits.yaml"), "--trainer.callbacks", "[]",
            "--trainer.enable_progress_bar", "false", "--data.init_args.num_calibration_samples", "20",
            "--data.init_args.num_eval_samples", "25", "--data.init_args.eval_subsets_per_bin", "2"]
VARIANTS = ["uncalibrated/plain", "binned/plain", "binned/consistent"]


def data():
    return PerturbationDataModule(**DATA)


def module():
    return ReCalXModule(model="reference:digits_cnn", num_bins=10)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Temperatures fitted on 20 digits images (reference CNN, cached after its first training)."""
    root = tmp_path_factory.mktemp("fit")
    trainer = L.Trainer(max_epochs=1, num_sanity_val_steps=0, enable_progress_bar=False, default_root_dir=root,
                        logger=L.pytorch.loggers.TensorBoardLogger(root, name="run"), limit_val_batches=0)
    trainer.fit(module(), data())
    return next(root.rglob("*.ckpt"))


def explain_here(checkpoint, output_dir, **kwargs):
    """`explain` in this process, one device."""
    trainer = ReCalXTrainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    options = dict(num_samples=2, num_heatmaps=0, output_dir=str(output_dir))
    options.update(kwargs)
    return trainer.explain(module(), data(), ckpt_path=str(checkpoint), **options)


def run_cli(args, cwd, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "recalx_lightning", "explain", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def merged(directory):
    return torch.load(Path(directory) / "attributions.pt", weights_only=True)


def assert_identical(a, b):
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("num_images", [24, 25])
def test_two_ddp_processes_equal_one_bit_for_bit(checkpoint, tmp_path, num_images):
    """gloo DDP on 2 CPU processes, another batch size: same merged attributions, every image exactly once."""
    single = explain_here(checkpoint, tmp_path / "one", limit=num_images)
    result = run_cli([*CLI_DATA, "--ckpt_path", str(checkpoint), "--num_samples", "2", "--num_heatmaps", "0",
                      "--limit", str(num_images), "--batch_size", "3", "--output_dir", str(tmp_path / "two"),
                      "--trainer.devices", "2", "--trainer.strategy", "ddp"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = merged(tmp_path / "one"), merged(tmp_path / "two")
    assert_identical(one, two)
    assert one["indices"].tolist() == list(range(num_images))
    assert set(one) == {"indices", "dataset_indices", "targets", "predictions", *VARIANTS}
    assert one["binned/consistent"].shape == (num_images, 64)
    assert not torch.equal(one["binned/plain"], one["binned/consistent"])
    ranks = {p.name.split("-rank")[1][:3] for p in (tmp_path / "two" / "shards").glob("*.pt")}
    assert ranks == {"000", "001"}
    written = json.loads((tmp_path / "two" / "explanations.json").read_text())
    # one pass per image for all variants: P·(d − 1) + 2 evaluations + one prediction, no duplicate image
    assert written["model_evaluations_this_run"] == single["model_evaluations_this_run"] == num_images * (2 * 63 + 3)


def test_kill_9_midway_then_rerun_resumes_to_the_identical_result(checkpoint, tmp_path):
    fresh = explain_here(checkpoint, tmp_path / "fresh", num_samples=6)
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    args = [*CLI_DATA, "--ckpt_path", str(checkpoint), "--num_samples", "6", "--num_heatmaps", "0",
            "--batch_size", "1", "--output_dir", str(out)]
    process = subprocess.Popen([sys.executable, "-m", "recalx_lightning", "explain", *args], cwd=tmp_path, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while len(list((out / "shards").glob("*.pt"))) < 3 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    shards = len(list((out / "shards").glob("*.pt")))
    assert 3 <= shards < 25 and not (out / "attributions.pt").exists(), "the run must be killed midway"
    (out / "shards" / ".half-written.pt.0123.tmp").write_bytes(b"\x00" * 10)  # an interrupted write
    resumed = explain_here(checkpoint, out, num_samples=6)
    assert_identical(merged(out), merged(tmp_path / "fresh"))
    assert 0 < resumed["model_evaluations_this_run"] < fresh["model_evaluations_this_run"]
    assert not list((out / "shards").glob(".*.tmp"))
    assert resumed["metrics"] == fresh["metrics"]


def test_summary_files_and_heatmap(checkpoint, tmp_path):
    result = explain_here(checkpoint, tmp_path, limit=12, num_heatmaps=3)
    assert (tmp_path / "explanations_heatmaps.png").exists()
    table = (tmp_path / "explanations.md").read_text()
    assert "| binned/consistent |" in table and "Δ" in table
    entry = result["summary"]["binned/plain"]["localization"]
    assert entry["num_pairs"] == 12 and entry["low"] <= entry["diff"] <= entry["high"]
    few = explain_here(checkpoint, tmp_path / "few", limit=4)
    assert few["summary"]["binned/plain"]["localization"]["low"] is None
    assert "< 10: no CI" in (tmp_path / "few" / "explanations.md").read_text()
    # rerunning a finished directory evaluates nothing and rewrites the same result
    again = explain_here(checkpoint, tmp_path, limit=12, num_heatmaps=3)
    assert again["model_evaluations_this_run"] == 0 and again["metrics"] == result["metrics"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(indices=[3, 25]), r"--indices \[25\] outside the evaluation split"),
        (dict(indices=[]), "selection from the evaluation split .* is empty"),
        (dict(output_dir="FILE/explained"), "`output_dir` .* is not writable"),
        (dict(calibrators=["binned", "isotonic"]), r"`calibrators` must be a non-empty list from \['uncalibrated'"),
        (dict(modes=["plain", "consistant"]), r"`modes` must be a non-empty list from \['plain', 'consistent'\]"),
    ],
)
def test_bad_input_fails_in_one_line_before_any_model_evaluation(checkpoint, tmp_path, kwargs, message):
    (tmp_path / "FILE").write_text("a file, not a folder")
    if "output_dir" in kwargs:
        kwargs = {**kwargs, "output_dir": str(tmp_path / kwargs["output_dir"])}
    model, evaluations = module(), []
    model.model.register_forward_hook(lambda *_: evaluations.append(1))
    trainer = ReCalXTrainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    options = {"num_samples": 2, "num_heatmaps": 0, "output_dir": str(tmp_path / "out"), **kwargs}
    with pytest.raises(ValueError, match=message) as error:
        trainer.explain(model, data(), ckpt_path=str(checkpoint), **options)
    assert "\n" not in str(error.value) and not evaluations


def test_resume_with_other_settings_and_mismatched_checkpoint_are_refused(checkpoint, tmp_path):
    explain_here(checkpoint, tmp_path, limit=2)
    recorded = json.loads((tmp_path / "settings.json").read_text())
    assert set(recorded) == {"method", "num_samples", "perturbations_per_eval", "seed", "level", "variants", "split",
                             "target", "precision", "num_features", "model", "model_kwargs", "data", "temperatures"}
    assert recorded["variants"] == VARIANTS and recorded["num_samples"] == 2 and recorded["level"] == "paper"
    with pytest.raises(ValueError, match="num_samples = 2 there, 3 now"):
        explain_here(checkpoint, tmp_path, limit=2, num_samples=3)
    trainer = ReCalXTrainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    coarse = PerturbationDataModule(**{**DATA, "patch_size": 8})
    with pytest.raises(ValueError, match="num_features: checkpoint 64, this run 16"):
        trainer.explain(module(), coarse, ckpt_path=str(checkpoint), output_dir=str(tmp_path / "coarse"))
    assert not (tmp_path / "coarse").exists()


def test_bf16_backbone_upcasts_logits_before_temperatures(checkpoint, tmp_path):
    """precision=bf16-mixed through the predict loop: finite float64 attributions close to fp32 ones."""
    full = explain_here(checkpoint, tmp_path / "fp32", limit=4)
    assert full is not None
    trainer = ReCalXTrainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                            precision="bf16-mixed")
    trainer.explain(module(), data(), ckpt_path=str(checkpoint), output_dir=str(tmp_path / "bf16"), limit=4,
                    num_samples=2, num_heatmaps=0)
    a, b = merged(tmp_path / "fp32"), merged(tmp_path / "bf16")
    for key in VARIANTS:
        assert b[key].dtype == torch.float64 and torch.isfinite(b[key]).all()
        assert not torch.equal(a[key], b[key])  # bf16 really ran
        assert (a[key] - b[key]).abs().max() < 0.1


def test_heatmaps_overlay_rgb_images_in_raw_pixel_space_with_shared_scale_names_and_boxes():
    from matplotlib.patches import Rectangle

    from recalx_lightning.models.info import ModelInfo
    from recalx_lightning.plots import display_image, readable_heatmaps

    torch.manual_seed(0)
    raw = torch.rand(2, 3, 224, 224)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    normalised = (raw - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    info = ModelInfo(num_classes=3, input_size=(3, 224, 224), mean=mean, std=std)
    assert torch.allclose(display_image(normalised[0], info), raw[0].permute(1, 2, 0).double(), atol=1e-6)
    maps = {"uncalibrated/plain": torch.randn(2, 224, 224), "binned/plain": 3 * torch.randn(2, 224, 224)}
    region = torch.zeros(224, 224, dtype=torch.bool)
    region[20:100, 30:150] = True
    figure = readable_heatmaps(normalised, maps, torch.tensor([2, 0]), torch.tensor([2, 1]),
                               class_names=["tench", "goldfish", "great white shark"], regions=[region, None],
                               model_info=info)
    axes = figure.axes
    titles = [axis.get_title() for axis in axes]
    assert "label: great white shark" in titles and "label: tench\n(predicted goldfish)" in titles
    heat_images = [axis.get_images()[-1] for axis in axes[1:3]]
    limits = {image.get_clim() for image in heat_images}
    assert len(limits) == 1  # one colour scale for the variants of an image, centred at 0
    low, high = limits.pop()
    assert low == -high == -max(float(m[0].abs().max()) for m in maps.values())
    assert len(axes) == 2 * 3 + 2  # two rows of panels, one colour bar per row
    boxes = [p for axis in axes[:3] for p in axis.patches if isinstance(p, Rectangle)]
    assert len(boxes) == 3 and boxes[0].get_width() == 120 and boxes[0].get_height() == 80
    assert not any(axis.patches for axis in axes[3:6])


def test_lime_through_the_predict_loop_costs_one_pass_for_all_variants(checkpoint, tmp_path):
    """Captum's surrogates run inside the predict loop (no inference tensors), one pass for the three variants."""
    result = explain_here(checkpoint, tmp_path, limit=2, method="lime", num_samples=20)
    assert result["model_evaluations_this_run"] == 2 * (20 + 1)
    attributions = merged(tmp_path)
    assert not torch.equal(attributions["binned/plain"], attributions["binned/consistent"])


def test_explain_dataset_without_lightning_equals_the_explain_subcommand(checkpoint, tmp_path):
    """The core `explain_dataset` on the same split, temperatures and seed gives the job's attributions bit for bit."""
    from recalx_lightning import explain_dataset
    from recalx_lightning.calibration import PerturbedImages, split_samples, split_seed
    from recalx_lightning.calibrators import BinnedTemperature
    from recalx_lightning.data import make_dataset
    from recalx_lightning.explain import ExplainSettings
    from recalx_lightning.models import create_model

    explain_here(checkpoint, tmp_path / "job", limit=4)
    job = merged(tmp_path / "job")
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    binned = BinnedTemperature(num_bins=10)
    binned.set_log_temperatures(state["calibrators.binned.log_temperature"], warn_on_bounds=False)
    base = make_dataset("digits", "val")
    _, evaluation = split_samples(len(base), DATA["num_calibration_samples"], DATA["num_eval_samples"], seed=0)
    perturbation = Perturbation.patches(image_size=32, patch_size=4, baseline="zeros")
    split = PerturbedImages(base, evaluation, perturbation, 10, DATA["eval_subsets_per_bin"],
                            split_seed(0, "evaluation"))
    core = explain_dataset(create_model("reference:digits_cnn").eval(), split, perturbation, {"binned": binned},
                           positions=range(4), settings=ExplainSettings(num_samples=2), progress=False)
    assert set(core["attributions"]) == set(VARIANTS)
    for key in VARIANTS:
        assert torch.equal(core["attributions"][key], job[key]), key
    assert torch.equal(core["predictions"], job["predictions"]) and core["summary"].keys() == set(VARIANTS)
