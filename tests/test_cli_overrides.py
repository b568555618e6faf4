"""Overriding one model or dataset option on the command line keeps the config's other options (the dotted
flag form merges into the config's dict; a JSON dict given to the parent flag would replace it whole)."""

import sys
from pathlib import Path

import pytest
import yaml

from recalx_lightning.lightning.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["recalx"])  # pytest's own arguments are not the CLI's


def printed_config(capsys, *args: str) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_one_model_option_keeps_the_others(capsys):
    config = printed_config(capsys, "--config", str(CONFIGS / "siglip.yaml"),
                            "--model.init_args.model_kwargs.pretrained", "/weights/open_clip_model.safetensors",
                            "--model.init_args.model_kwargs.batch_classes", "20")
    kwargs = config["model"]["init_args"]["model_kwargs"]
    assert kwargs["pretrained"] == "/weights/open_clip_model.safetensors"
    assert kwargs["batch_classes"] == 20  # typed from the command line, not a string
    assert kwargs["class_names"] == "imagenet"
    assert kwargs["class_embeddings_path"].endswith("siglip_imagenet_class_embeddings.pt")


@pytest.mark.parametrize("name", ["densenet", "vit", "siglip"])
def test_one_dataset_option_keeps_the_others(capsys, name, tmp_path):
    config = printed_config(capsys, "--config", str(CONFIGS / f"{name}.yaml"),
                            "--data.init_args.dataset_kwargs.root", str(tmp_path),
                            "--data.init_args.dataset_kwargs.class_index", str(tmp_path / "LOC_synset_mapping.txt"))
    kwargs = config["data"]["init_args"]["dataset_kwargs"]
    assert kwargs["root"] == str(tmp_path) and kwargs["class_index"].endswith("LOC_synset_mapping.txt")
    assert "annotations_dir" in kwargs  # the config's other keys survive


def test_dotted_option_on_a_config_without_that_dict(capsys):
    config = printed_config(capsys, "--config", str(CONFIGS / "vit.yaml"),
                            "--model.init_args.model_kwargs.pretrained_file", "/weights/vit.safetensors")
    assert config["model"]["init_args"]["model_kwargs"] == {"pretrained_file": "/weights/vit.safetensors"}


TABULAR = ["--config", str(CONFIGS / "tabular.yaml"), "--model.init_args.model", "mlp",
           "--model.init_args.model_kwargs", '{"in_features": 30, "num_classes": 2, "hidden_sizes": [4]}',
           "--trainer.logger", "false"]


def test_num_bins_is_set_once_on_the_data():
    from recalx_lightning.lightning.cli import _cli

    cli = _cli([*TABULAR, "--data.init_args.num_bins", "4"], run=False)
    assert cli.datamodule.hparams.num_bins == cli.model.hparams.num_bins == 4
    assert cli.model.calibrators["binned"].num_bins == cli.model.calibrators["smooth"].num_bins == 4


@pytest.mark.parametrize("model_bins", [10, 4])
def test_a_config_that_still_sets_the_model_num_bins(tmp_path, model_bins):
    """Configs written before num_bins moved to the data keep working when both agree, and fail naming the
    file when they do not (the link alone would silently ignore the model's value)."""
    from recalx_lightning.lightning.cli import _cli

    old = yaml.safe_load((CONFIGS / "tabular.yaml").read_text())
    old["model"]["init_args"]["num_bins"] = model_bins
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(old))
    args = ["--config", str(path), *TABULAR[2:]]
    if model_bins == 10:
        assert _cli(args, run=False).model.hparams.num_bins == 10
        return
    with pytest.raises(ValueError, match=f"--config {path} sets model num_bins = 4 but data.init_args.num_bins = 10"):
        _cli(args, run=False)
