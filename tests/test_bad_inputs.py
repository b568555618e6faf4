"""Bad inputs and hostile files, API and CLI: each is refused with one line naming the parameter and the fix.

CLI cases call the entry point in-process (``recalx_lightning.lightning.cli.main``), which prints the one-line error and
exits with status 2.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import lightning as L
import pytest
import torch

from recalx_lightning import ExplanationQualityCallback, PerturbationDataModule, ReCalXModule, load_calibrator
from recalx_lightning.calibrators import BinnedTemperature
from recalx_lightning.checkpoints import load_checkpoint, restore_checkpoint
from recalx_lightning.explain import explain
from recalx_lightning.fitting import fit_temperatures
from recalx_lightning.lightning import connect
from recalx_lightning.lightning.cli import main
from recalx_lightning.lightning.trainer import ReCalXTrainer
from recalx_lightning.models import create_model
from recalx_lightning.models.info import read_state_dict
from recalx_lightning.models.zero_shot import load_class_embeddings
from recalx_lightning.perturbation import Perturbation

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
ROOT = Path(__file__).resolve().parents[1]
MLP = {"in_features": 13, "num_classes": 3, "hidden_sizes": [8]}
CLI_MLP = {"in_features": 30, "num_classes": 2, "hidden_sizes": [8]}
CLI_ARGS = [
    "--config", str(ROOT / "configs" / "tabular.yaml"),
    "--model.init_args.model", "mlp", "--model.init_args.model_kwargs", json.dumps(CLI_MLP),
    "--data.init_args.num_calibration_samples", "10", "--data.init_args.num_eval_samples", "8",
    "--data.init_args.subsets_per_bin", "3", "--data.init_args.eval_subsets_per_bin", "3",
    "--data.init_args.batch_size", "4", "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
]


def small_data(**overrides) -> PerturbationDataModule:
    kwargs = dict(dataset="wine", split="train", features="tabular", num_bins=5, subsets_per_bin=4,
                  num_calibration_samples=12, num_eval_samples=10, eval_subsets_per_bin=6, batch_size=6, seed=3)
    return PerturbationDataModule(**{**kwargs, **overrides})


def small_module(**overrides) -> ReCalXModule:
    torch.manual_seed(0)
    return ReCalXModule(**{"model": "mlp", "model_kwargs": MLP, "num_bins": 5, **overrides})


def connected() -> ReCalXModule:
    """A small module connected to the small data (outside a trainer, as ``explain`` does)."""
    module = small_module()
    connect(module, small_data())
    return module


def quiet_trainer(root: Path, **kwargs) -> L.Trainer:
    return ReCalXTrainer(max_epochs=1, num_sanity_val_steps=0, default_root_dir=root, enable_progress_bar=False,
                         enable_model_summary=False, logger=L.pytorch.loggers.TensorBoardLogger(root, name="run"),
                         **kwargs)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> dict[str, Path]:
    """A fitted wine run (5 bins, zero baseline): its checkpoint and calibrator file."""
    root = tmp_path_factory.mktemp("fitted")
    run = quiet_trainer(root)
    run.fit(small_module(), small_data())
    log_dir = Path(run.log_dir)
    return {"checkpoint": next(log_dir.rglob("*.ckpt")), "calibrator": log_dir / "calibrator.pt", "root": root}


@pytest.fixture(scope="module")
def cli_checkpoint(tmp_path_factory) -> Path:
    """A fitted CLI run on breast cancer (10 bins) with the tiny MLP."""
    root = tmp_path_factory.mktemp("cli")
    previous = Path.cwd()
    os.chdir(root)
    try:
        main(["fit", *CLI_ARGS])
    finally:
        os.chdir(previous)
    return next(root.rglob("*.ckpt"))


class _Marker:
    """Unpickling runs code: creates the file named ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def _write(path: Path, payload) -> Path:
    torch.save(payload, path)
    return path


def _saved_calibrator(tmp_path: Path, **changes) -> Path:
    payload = {"kind": "binned", "config": {"num_bins": 4}, "log_temperature": torch.zeros(4, dtype=torch.float64)}
    return _write(tmp_path / "calibrator.pt", {**payload, **changes})


def _embeddings(tmp_path: Path, embeddings: torch.Tensor) -> Path:
    return _write(tmp_path / "embeddings.pt", {"embeddings": embeddings, "class_names": ["a", "b"]})


def _logits(n: int = 40, k: int = 4):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, k, generator=g), torch.randint(0, k, (n,), generator=g), torch.rand(n, generator=g)


class _ProbabilityModel(torch.nn.Module):
    def forward(self, x):
        return torch.nn.functional.linear(x, torch.ones(3, x.shape[1])).softmax(-1)


class _LogitModel(torch.nn.Module):
    def forward(self, x):
        return torch.nn.functional.linear(x, torch.arange(3.0)[:, None].expand(3, x.shape[1]))


# ------------------------------------------------------------------------------------------- API cases
def _api_cases(tmp_path: Path):
    """Name → (call, pattern its one-line message must match). Files are written by :func:`_bad_files`."""
    logits, labels, levels = _logits()
    truncated, text_file, hostile = tmp_path / "truncated.pt", tmp_path / "notes.txt", tmp_path / "hostile.pt"
    tabular = Perturbation.tabular(4)
    x = torch.randn(2, 4)
    return {
        "tolerance zero": (
            lambda: fit_temperatures(logits, labels, levels, tolerance=0),
            r"`tolerance` must be a number in \(0, 1\)",
        ),
        "tolerance negative": (
            lambda: fit_temperatures(logits, labels, levels, tolerance=-1e-8),
            r"`tolerance` must be",
        ),
        "tolerance NaN": (
            lambda: fit_temperatures(logits, labels, levels, tolerance=float("nan")),
            r"`tolerance` must be",
        ),
        "unknown method": (
            lambda: fit_temperatures(logits, labels, levels, method="bfgs"),
            r"`method` must be 'auto', 'newton' or 'lbfgs'",
        ),
        "max_iter zero": (
            lambda: fit_temperatures(logits, labels, levels, max_iter=0),
            r"`max_iter` must be an integer >= 1",
        ),
        "chunk_size zero": (
            lambda: fit_temperatures(logits, labels, levels, chunk_size=0),
            r"`chunk_size` must be an integer >= 1",
        ),
        "NaN logits": (
            lambda: fit_temperatures(logits * float("nan"), labels, levels),
            r"`logits` contains 160 non-finite values.*Check the model",
        ),
        "labels out of range": (
            lambda: fit_temperatures(logits, labels + 4, levels),
            r"`labels` must lie in \[0, 4\).*class count",
        ),
        "levels above one": (
            lambda: fit_temperatures(logits, labels, levels + 1),
            r"`levels` are perturbation levels .* \[0, 1\]",
        ),
        "smooth with newton": (
            lambda: fit_temperatures(logits, labels, levels, "smooth", method="newton"),
            r"use 'lbfgs' for smooth",
        ),
        "NaN temperature set": (
            lambda: BinnedTemperature(3).set_log_temperatures(torch.tensor([0.0, float("nan"), 0.0])),
            r"bins \[1\] are not finite.*refit",
        ),
        "wrong-length temperatures": (
            lambda: BinnedTemperature(3).set_log_temperatures(torch.zeros(5)),
            r"has 3 temperatures but got .* shape \(5,\).*num_bins=5",
        ),
        "calibrator file with NaN": (
            lambda: load_calibrator(_saved_calibrator(tmp_path, log_temperature=torch.full((4,), float("nan")))),
            r"calibrator file .* is invalid: .*not finite",
        ),
        "calibrator file wrong length": (
            lambda: load_calibrator(_saved_calibrator(tmp_path, log_temperature=torch.zeros(7))),
            r"calibrator file .* is invalid: .*has 4 temperatures",
        ),
        "calibrator file unknown kind": (
            lambda: load_calibrator(_saved_calibrator(tmp_path, kind="fancy")),
            r"is malformed \(kind 'fancy'.*re-export",
        ),
        "calibrator file bad config": (
            lambda: load_calibrator(_saved_calibrator(tmp_path, config={"bins": 4})),
            r"calibrator file .* is invalid: .*bins",
        ),
        "calibrator file truncated": (
            lambda: load_calibrator(truncated),
            r"calibrator file .*truncated.pt' is truncated or not a torch file.*re-create",
        ),
        "calibrator file is text": (lambda: load_calibrator(text_file), r"notes.txt' is truncated or not a torch file"),
        "calibrator file runs code": (
            lambda: load_calibrator(hostile),
            r"hostile.pt' holds Python objects, not only tensors, and is refused",
        ),
        "calibrator file missing": (
            lambda: load_calibrator(tmp_path / "none.pt"),
            r"no calibrator file at .*fit run writes",
        ),
        "checkpoint is foreign": (
            lambda: load_checkpoint(_write(tmp_path / "other.ckpt", {"weights": torch.zeros(2)})),
            r"not a ReCalX Lightning checkpoint.*written by `fit`",
        ),
        "checkpoint runs code": (lambda: load_checkpoint(hostile), r"refused \(files are loaded weights-only"),
        "checkpoint missing": (
            lambda: load_checkpoint(tmp_path / "none.ckpt"),
            r"checkpoint .*none.ckpt' does not exist",
        ),
        "weights file truncated": (
            lambda: read_state_dict(truncated),
            r"weights file .* is truncated or not a torch file",
        ),
        "import spec without opt-in": (lambda: create_model("import:torch.nn:Linear"), r"RECALX_ALLOW_IMPORT=1"),
        "embedding cache rows": (
            lambda: load_class_embeddings(_embeddings(tmp_path, torch.zeros(3, 4))),
            r"has 3 embeddings for 2 class names; delete it",
        ),
        "embedding cache NaN": (
            lambda: load_class_embeddings(_embeddings(tmp_path, torch.full((2, 4), float("nan")))),
            r"non-finite embeddings; delete it",
        ),
        "embedding cache foreign": (
            lambda: load_class_embeddings(_write(tmp_path / "e.pt", [1, 2])),
            r"is not a class-embedding file",
        ),
        "model returns probabilities": (
            lambda: explain(_ProbabilityModel(), x, tabular, num_samples=2),
            r"look like probabilities.*Drop the model's final softmax",
        ),
        "target out of range": (
            lambda: explain(_LogitModel(), x, tabular, target=3, num_samples=2),
            r"`target` must lie in \[0, 3\) \(the model has 3 classes\)",
        ),
        "negative target": (
            lambda: explain(_LogitModel(), x, tabular, target=torch.tensor([0, -1]), num_samples=2),
            r"`target` must lie in \[0, 3\)",
        ),
        "uint8 input, fractional baseline": (
            lambda: Perturbation.tabular(4, baseline=0.5).apply(torch.ones(1, 4, dtype=torch.uint8), torch.zeros(1, 4)),
            r"integer dtype torch.uint8 .*fractional values \(e.g. 0.5\).*convert the inputs to float",
        ),
        "callback calibrator name": (
            lambda: ExplanationQualityCallback(calibrators=["binnd"]),
            r"`calibrators` must be a non-empty list from \['uncalibrated'",
        ),
        "callback mode": (
            lambda: ExplanationQualityCallback(modes=["plane"]),
            r"`modes` must be a non-empty list from \['plain', 'consistent'\]",
        ),
        "callback method": (
            lambda: ExplanationQualityCallback(method="shap"),
            r"`method` must be one of \['shapley_sampling'",
        ),
        "callback num_samples": (
            lambda: ExplanationQualityCallback(num_samples=0),
            r"`num_samples` must be an integer >= 1",
        ),
    }


def _bad_files(tmp_path: Path) -> None:
    truncated = _write(tmp_path / "truncated.pt", {"kind": "binned", "config": {}, "log_temperature": torch.zeros(10)})
    truncated.write_bytes(truncated.read_bytes()[:60])
    (tmp_path / "notes.txt").write_text("not a tensor file")
    _write(tmp_path / "hostile.pt", {"kind": "binned", "x": _Marker(str(tmp_path / "ran"))})


API_CASES = list(_api_cases(Path("unused")))


@pytest.mark.parametrize("case", API_CASES)
def test_api_bad_input_is_refused_in_one_line(case, tmp_path, monkeypatch):
    monkeypatch.delenv("RECALX_ALLOW_IMPORT", raising=False)
    _bad_files(tmp_path)
    call, pattern = _api_cases(tmp_path)[case]
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    assert re.search(pattern, message), message
    assert not (tmp_path / "ran").exists(), "a file ran code while loading"


def test_import_spec_builds_only_module_classes(monkeypatch):
    monkeypatch.setenv("RECALX_ALLOW_IMPORT", "1")
    with pytest.raises(ValueError, match=r"'import:os:system' is a builtin_function_or_method, not a torch.nn.Module"):
        create_model("import:os:system", init_args={"command": "touch /tmp/recalx_should_not_exist"})


# ----------------------------------------------------------------------------- checkpoints against a run
@pytest.mark.parametrize(
    ("module_changes", "data_changes", "pattern"),
    [
        ({"num_bins": 4}, {"num_bins": 4}, r"model.num_bins: checkpoint 5, this run 4"),
        ({"calibrator": "smooth"}, {}, r"model.calibrator: checkpoint 'binned', this run 'smooth'"),
        ({"max_temperature": 50.0}, {}, r"model.max_temperature: checkpoint 100.0, this run 50.0"),
        ({}, {"baseline": "uniform"}, r"baseline: checkpoint \"\('zeros', None, 'input'\)\", this run \"\('uniform'"),
    ],
)
@pytest.mark.parametrize("stage", ["validate", "test", "explain"])
def test_checkpoint_for_another_setup_is_refused_naming_both_values(fitted, stage, module_changes, data_changes,
                                                                    pattern, tmp_path):
    module, datamodule = small_module(**module_changes), small_data(**data_changes)
    run = quiet_trainer(tmp_path)
    with pytest.raises(ValueError, match=pattern) as info:
        if stage == "explain":
            run.explain(module, datamodule, ckpt_path=str(fitted["checkpoint"]), indices=[0], num_samples=1)
        else:
            getattr(run, stage)(module, datamodule, ckpt_path=str(fitted["checkpoint"]))
    assert "fitted for another setup" in str(info.value) and "\n" not in str(info.value)
    assert module.backbone_forwards == 0


def test_checkpoint_for_another_class_count_and_feature_layout_is_refused(fitted):
    checkpoint = load_checkpoint(fitted["checkpoint"])
    module, datamodule = small_module(model_kwargs={**MLP, "num_classes": 4}), small_data()
    checkpoint["hyper_parameters"]["model_kwargs"] = module.hparams.model_kwargs
    with pytest.raises(ValueError, match=r"num_classes: checkpoint 3, this run 4"):
        from recalx_lightning.checkpoints import check_checkpoint

        check_checkpoint(checkpoint, module)
    checkpoint = load_checkpoint(fitted["checkpoint"])
    checkpoint["recalx_fit_signature"]["feature_mask_sha1"] = "0" * 40
    module = small_module()
    connect(module, datamodule)
    with pytest.raises(ValueError, match=r"another feature layout"):
        check_checkpoint(checkpoint, module)


def test_checkpoint_with_nan_temperatures_is_refused(fitted, tmp_path):
    checkpoint = load_checkpoint(fitted["checkpoint"])
    checkpoint["state_dict"]["calibrators.binned.log_temperature"][2] = float("nan")
    path = _write(tmp_path / "nan.ckpt", checkpoint)
    with pytest.raises(ValueError, match=r"calibrators.binned.log_temperature holds non-finite temperatures"):
        restore_checkpoint(connected(), path)


def test_explain_never_runs_code_from_a_checkpoint(tmp_path):
    hostile = _write(tmp_path / "hostile.ckpt", {"state_dict": {}, "hyper_parameters": {},
                                                 "x": _Marker(str(tmp_path / "ran"))})
    with pytest.raises(ValueError, match="refused"):
        quiet_trainer(tmp_path).explain(small_module(), small_data(), ckpt_path=str(hostile), indices=[0])
    assert not (tmp_path / "ran").exists()


def test_matching_checkpoint_still_restores(fitted, tmp_path):
    module = connected()
    restore_checkpoint(module, fitted["checkpoint"])
    assert bool(module.fitted)
    assert torch.equal(module.calibrator.temperatures, load_calibrator(fitted["calibrator"]).temperatures)


def test_callback_calibrator_missing_from_module_fails_before_the_fit(tmp_path):
    module = small_module(compare_calibrators=False)
    callback = ExplanationQualityCallback(num_images=1, calibrators=["uncalibrated", "smooth"], num_samples=1)
    with pytest.raises(ValueError, match=r"from \['uncalibrated', 'binned'\].*compare_calibrators: true"):
        quiet_trainer(tmp_path, callbacks=[callback]).fit(module, small_data())
    assert module.backbone_forwards == 0


# ------------------------------------------------------------------------------------------- CLI cases
def _cli_error(args: list[str], cwd: Path, capsys) -> str:
    previous = Path.cwd()
    os.chdir(cwd)
    try:
        with pytest.raises(SystemExit) as info:
            main(args)
    finally:
        os.chdir(previous)
    assert info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("recalx_lightning: error:")]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize(
    ("extra", "pattern"),
    [
        (["--trainer.devices", "0"], r"`trainer.devices` must be >= 1 .* got '?0'?; e.g. --trainer.devices 1"),
        (["--trainer.logger.init_args.name", "../../x"], r"`trainer.logger.init_args.name` must be a plain folder"),
        (["--trainer.logger.init_args.version", "a/b"], r"`trainer.logger.init_args.version` must be a plain folder"),
        (["--trainer.logger.init_args.save_dir", "{file}/logs"], r"`trainer.logger.init_args.save_dir` .* writable"),
        (["--trainer.default_root_dir", "{file}/root"], r"is not writable"),
        (["--model.init_args.model", "import:torch.nn:Linear"], r"RECALX_ALLOW_IMPORT=1"),
        (["--data.init_args.num_bins", "0"], r"`num_bins` must be an integer >= 1"),
    ],
)
def test_cli_fit_bad_option_fails_in_one_line_and_writes_nothing(extra, pattern, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RECALX_ALLOW_IMPORT", raising=False)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    extra = [e.replace("{file}", str(blocker)) for e in extra]
    line = _cli_error(["fit", *CLI_ARGS, *extra], tmp_path, capsys)
    assert re.search(pattern, line), line
    assert not list(tmp_path.rglob("version_*")) and not (tmp_path.parent / "x").exists()


@pytest.mark.parametrize(
    ("extra", "pattern"),
    [
        (["--ckpt_path", "{missing}"], r"checkpoint .*missing.ckpt' does not exist"),
        (["--ckpt_path", "{ckpt}", "--data.init_args.num_bins", "4"],
         r"fitted with other model arguments \(model.num_bins: checkpoint 10, this run 4\).*config.yaml"),
        (["--ckpt_path", "{ckpt}", "--model.init_args.calibrator", "smooth"],
         r"model.calibrator: checkpoint 'binned', this run 'smooth'"),
        (["--ckpt_path", "{ckpt}", "--data.init_args.baseline", "uniform"], r"fitted for another setup \(baseline"),
        (["--ckpt_path", "{foreign}"], r"not a ReCalX Lightning checkpoint"),
    ],
)
@pytest.mark.parametrize("subcommand", ["validate", "test"])
def test_cli_checkpoint_mismatch_fails_in_one_line(subcommand, extra, pattern, cli_checkpoint, tmp_path, capsys):
    foreign = _write(tmp_path / "foreign.ckpt", {"weights": torch.zeros(2)})
    values = {"{missing}": str(tmp_path / "missing.ckpt"), "{ckpt}": str(cli_checkpoint), "{foreign}": str(foreign)}
    extra = [values.get(e, e) for e in extra]
    line = _cli_error([subcommand, *CLI_ARGS, *extra], tmp_path, capsys)
    assert re.search(pattern, line), line


def test_cli_default_root_dir_holds_every_file(tmp_path):
    previous = Path.cwd()
    os.chdir(tmp_path)
    try:
        main(["fit", *CLI_ARGS, "--trainer.default_root_dir", str(tmp_path / "runs")])
    finally:
        os.chdir(previous)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written and all(p.is_relative_to(tmp_path / "runs" / "logs" / "tabular") for p in written), written
    assert list((tmp_path / "runs").rglob("*.ckpt")) and list((tmp_path / "runs").rglob("calibrator.pt"))


@pytest.mark.parametrize("stage", ["validate", "test", "fit"])
def test_trainer_methods_read_a_bad_checkpoint_with_the_validated_loader(stage, fitted, tmp_path):
    """From Python as from the CLI: a truncated or hostile ``ckpt_path`` fails in one line, before any forward."""
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(fitted["checkpoint"].read_bytes()[:200])
    hostile = _write(tmp_path / "hostile.ckpt", {"state_dict": {}, "hyper_parameters": {},
                                                 "x": _Marker(str(tmp_path / "ran"))})
    for path, pattern in ((truncated, "is truncated or not a torch file"), (hostile, "refused")):
        module = small_module()
        with pytest.raises(ValueError, match=pattern):
            getattr(quiet_trainer(tmp_path), stage)(module, datamodule=small_data(), ckpt_path=str(path))
        assert module.backbone_forwards == 0
    assert not (tmp_path / "ran").exists()
