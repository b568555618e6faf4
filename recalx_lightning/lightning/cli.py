"""Command line: ``python -m recalx_lightning {fit,validate,test,explain} --config configs/<name>.yaml``.

LightningCLI with class_path/init_args configs. Defaults: one epoch (fitting temperatures needs a single pass),
no sanity validation (it would evaluate unfitted temperatures), TensorBoard logs in ``logs/<name>/version_N``.
``python -m recalx_lightning train-reference NAME ...|all`` trains embedded reference models (``... list``);
``python -m recalx_lightning class-embeddings --model open_clip:... --class_names imagenet --output FILE`` builds the
(K, D) text embeddings of a zero-shot classifier once, for ``model_kwargs.class_embeddings_path``.

A run that fails before producing a result (bad config, missing data, class-count mismatch) leaves no log
directory behind.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Any

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from recalx_lightning.explain.store import check_writable
from recalx_lightning.lightning._quiet import quiet_lightning
from recalx_lightning.lightning.datamodule import PerturbationDataModule
from recalx_lightning.lightning.module import ReCalXModule, remove_unfinished_run
from recalx_lightning.lightning.trainer import ReCalXTrainer


class ReCalXCLI(LightningCLI):
    """LightningCLI with the ``explain`` subcommand; removes the log directory of a run that failed early."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "explain": {"model", "datamodule"}}

    def add_arguments_to_parser(self, parser) -> None:
        """``num_bins`` has one owner, the data: the module takes ``data.init_args.num_bins``."""
        parser.link_arguments("data.init_args.num_bins", "model.init_args.num_bins")

    def parse_arguments(self, parser, args) -> None:
        """Parse, then refuse a ``model`` ``num_bins`` that differs from the data's (the link would ignore it)."""
        super().parse_arguments(parser, args)
        config = self.config[self.config.subcommand] if self.config.get("subcommand") else self.config
        data = config.get("data")
        data_bins = data.get("init_args", data).get("num_bins") if data is not None else None
        for where, value in model_num_bins_given(sys.argv[1:] if args is None else args):
            if data_bins is not None and value != data_bins:
                raise ValueError(
                    f"{where} sets model num_bins = {value} but data.init_args.num_bins = {data_bins}; num_bins is "
                    "set once, on the data (the model takes the same): drop the model's or set "
                    "--data.init_args.num_bins."
                )

    def before_instantiate_classes(self) -> None:
        """Validate the data config before the backbone is built (and maybe downloaded)."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.get("trainer")
        if trainer is not None:
            check_devices(trainer.get("devices"))
            place_outputs(trainer)
        data = config.get("data")
        if data is not None and data.get("class_path", "").endswith("PerturbationDataModule"):
            PerturbationDataModule(**data.init_args.as_dict())

    def _parse_ckpt_path(self) -> None:
        """Check ``--ckpt_path`` before anything is built: it must exist and be a ReCalX checkpoint (read
        weights-only), and its fitted hyper-parameters must agree with the run's model arguments. Lightning would
        instead copy them over the config, silently overriding what the user gave on the command line."""
        if not self.config.get("subcommand"):
            return
        config = self.config[self.config.subcommand]
        ckpt_path = config.get("ckpt_path")
        if not ckpt_path:
            return
        from recalx_lightning.checkpoints import hparam_mismatches, load_checkpoint

        checkpoint = load_checkpoint(ckpt_path)
        model = config.get("model")
        run = model.get("init_args") if model is not None and "init_args" in model else model
        run = run.as_dict() if hasattr(run, "as_dict") else dict(run or {})
        mismatches = hparam_mismatches(checkpoint["hyper_parameters"], run)
        if mismatches:
            raise ValueError(
                f"checkpoint {str(ckpt_path)!r} was fitted with other model arguments ({'; '.join(mismatches)}); "
                "pass the checkpoint's values (see its config.yaml) or refit."
            )

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            remove_unfinished_run(getattr(self.trainer, "log_dir", None))
            raise


def model_num_bins_given(argv: list[str]) -> list[tuple[str, Any]]:
    """Every ``num_bins`` given for the model, on the command line or in a ``--config`` file: (where, value)."""
    import yaml

    found: list[tuple[str, Any]] = []
    names = ("--model.init_args.num_bins", "--model.num_bins")
    for i, token in enumerate(argv):
        key, equals, value = token.partition("=")
        if not equals and i + 1 < len(argv):
            value = argv[i + 1]
        if key in names:
            found.append((key, _as_int(value)))
        elif key == "--config" and os.path.isfile(value):
            with open(value) as file:
                loaded = yaml.safe_load(file)
            model = loaded.get("model") if isinstance(loaded, dict) else None
            model = model.get("init_args", model) if isinstance(model, dict) else None
            if isinstance(model, dict) and "num_bins" in model:
                found.append((f"--config {value}", model["num_bins"]))
    return found


def _as_int(value: str) -> Any:
    return int(value) if value.strip().lstrip("-").isdigit() else value


def check_devices(devices: Any) -> None:
    """``trainer.devices`` must be a positive count, -1 (all), 'auto' or a list of device ids."""
    value = devices
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and (value == 0 or value < -1):
        raise ValueError(
            f"`trainer.devices` must be >= 1 (a device count), -1 (all devices), 'auto' or a list of device ids, "
            f"got {devices!r}; e.g. --trainer.devices 1."
        )


def place_outputs(trainer: Any) -> None:
    """Keep every file of the run under its log directory, rooted at ``trainer.default_root_dir`` when given.

    A logger's relative ``save_dir`` is taken relative to ``default_root_dir`` (the shipped configs name
    ``save_dir: logs``); ``name``/``version``/``sub_dir`` must be plain folder names (no ``..`` or separators);
    the directory that would be created must be writable.
    """
    root = trainer.get("default_root_dir")
    loggers = trainer.get("logger")
    loggers = loggers if isinstance(loggers, list) else [loggers]
    for logger in loggers:
        init_args = logger.get("init_args") if hasattr(logger, "get") else None
        if init_args is None:
            continue
        for key in ("name", "version", "sub_dir"):
            part = init_args.get(key)
            if isinstance(part, str) and (part in ("..", ".") or "/" in part or os.sep in part or ".." in part):
                raise ValueError(
                    f"`trainer.logger.init_args.{key}` must be a plain folder name without '/' or '..', got "
                    f"{part!r}; choose where runs go with --trainer.logger.init_args.save_dir or "
                    "--trainer.default_root_dir."
                )
        save_dir = init_args.get("save_dir")
        if isinstance(save_dir, str) and root and not os.path.isabs(save_dir):
            save_dir = os.path.join(str(root), save_dir)
            init_args["save_dir"] = save_dir
        if isinstance(save_dir, str):
            check_writable(save_dir, "trainer.logger.init_args.save_dir")
    if root:
        check_writable(str(root), "trainer.default_root_dir")


def trainer_defaults() -> dict[str, Any]:
    return {
        "max_epochs": 1,
        "num_sanity_val_steps": 0,
        "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                   "init_args": {"save_dir": "logs", "name": "recalx"}},
    }


def main(args: list[str] | None = None) -> ReCalXCLI | None:
    """Entry point of ``python -m recalx_lightning`` and the ``recalx`` script."""
    argv = sys.argv[1:] if args is None else args
    quiet_lightning()
    if argv and argv[0] == "train-reference":
        from recalx_lightning.models.reference import main as train_reference

        rest = argv[1:]
        train_reference(rest if rest[:1] == ["list"] else ["train", *rest])
        return None
    try:
        if argv and argv[0] == "class-embeddings":
            class_embeddings_command(argv[1:])
            return None
        return _cli(args)
    except Exception as error:  # noqa: BLE001 - shown as one clear line, traceback with RECALX_DEBUG=1
        cause = _own_error(error)
        if cause is None or os.environ.get("RECALX_DEBUG"):
            raise
        print(f"recalx_lightning: error: {type(cause).__name__}: {cause}", file=sys.stderr)
        raise SystemExit(2) from None


def class_embeddings_command(argv: list[str]) -> None:
    """``class-embeddings``: encode class names × templates with an open_clip text tower and save (K, D)."""
    import argparse
    import json

    from recalx_lightning.models.zero_shot import DEFAULT_TEMPLATES, build_class_embeddings

    parser = argparse.ArgumentParser(
        prog="python -m recalx_lightning class-embeddings",
        description="Build the class-embedding file of an open_clip zero-shot classifier once (slow on a CPU; "
        "uses CUDA when available), then pass it as model_kwargs.class_embeddings_path: fit needs neither the "
        "tokenizer nor the hub.",
    )
    parser.add_argument("--model", required=True, help="e.g. open_clip:ViT-B-16-SigLIP/webli")
    parser.add_argument("--class_names", required=True, help="'imagenet', a JSON/text file, or a JSON list")
    parser.add_argument("--output", required=True, help="file to write (.pt)")
    parser.add_argument("--templates", default=None, help="JSON list of prompts with '{}' (default: 6 prompts)")
    parser.add_argument("--pretrained", default=None, help="local weights file (default: the tag in --model)")
    parser.add_argument("--tokenizer", default=None, help="local folder with Hugging Face tokenizer files")
    parser.add_argument("--batch_classes", type=int, default=50, help="classes per text-tower forward")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ns = parser.parse_args(argv)
    if not ns.model.startswith("open_clip:"):
        raise SystemExit(f"class-embeddings: --model must be an open_clip model ('open_clip:<model>/<tag>'), "
                         f"got {ns.model!r}")
    names = json.loads(ns.class_names) if ns.class_names.lstrip().startswith("[") else ns.class_names
    templates = json.loads(ns.templates) if ns.templates else DEFAULT_TEMPLATES
    path = build_class_embeddings(ns.model, names, ns.output, templates, pretrained=ns.pretrained,
                                  tokenizer=ns.tokenizer, batch_classes=ns.batch_classes, device=ns.device)
    print(f"wrote {path}: pass it as --model.init_args.model_kwargs.class_embeddings_path {path}")


def _own_error(error: BaseException) -> BaseException | None:
    """The first exception in ``error``'s cause chain raised by this package or by Lightning for a bad option
    (config wrappers are skipped)."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    seen: BaseException | None = error
    while seen is not None:
        frames = traceback.extract_tb(seen.__traceback__)
        if frames and f"{os.sep}recalx_lightning{os.sep}" in frames[-1].filename:
            return seen
        if isinstance(seen, MisconfigurationException):  # Lightning's own verdict on a bad option
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _cli(args: list[str] | None, **kwargs: Any) -> ReCalXCLI:
    return ReCalXCLI(
        ReCalXModule,
        PerturbationDataModule,
        trainer_class=ReCalXTrainer,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        trainer_defaults=trainer_defaults(),
        save_config_kwargs={"overwrite": True},
        args=args,
        **kwargs,
    )


__all__ = ["ReCalXCLI", "TensorBoardLogger", "main"]
