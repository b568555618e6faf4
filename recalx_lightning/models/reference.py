"""Reference models for the embedded data, trained by the project itself and cached: no download needed.

``load_reference_model(name)`` returns the cached model, training it first (seeded, a few seconds to a minute on
one CPU thread) when the cache has none. Cache: ``$RECALX_CACHE`` or ``~/.cache/recalx_lightning``, one
``reference/<name>.pt`` state dict and a ``reference/<name>.json`` record (accuracies, seed, versions), both
written atomically. Command line::

    python -m recalx_lightning.models.reference train digits_cnn [--cache-dir D] [--force]
    python -m recalx_lightning.models.reference list

Image models take raw pixels in [0, 1] (mean 0, std 1: the zero baseline is the black background).
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from recalx_lightning.data import make_dataset
from recalx_lightning.models.info import ModelInfo, load_checked_state_dict, set_model_info
from recalx_lightning.models.modules import MLP, SmallCNN

_FORMAT_VERSION = 1


def _densenet(in_chans: int, num_classes: int) -> nn.Module:
    import timm

    return timm.create_model(
        "densenet121",
        pretrained=False,
        growth_rate=12,
        block_config=(2, 2, 2),
        in_chans=in_chans,
        num_classes=num_classes,
    )


def _vit(in_chans: int, num_classes: int, img_size: int) -> nn.Module:
    import timm

    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=img_size,
        patch_size=4,
        embed_dim=64,
        depth=2,
        num_heads=4,
        in_chans=in_chans,
        num_classes=num_classes,
    )


@dataclass(frozen=True)
class ReferenceSpec:
    """How a reference model is built and trained.

    Attributes:
        dataset: name for :func:`recalx_lightning.data.make_dataset`; ``dataset_kwargs`` for every split,
            ``train_kwargs`` for the training split only.
        build: () → untrained module.
        input_size, patch_grid, raw_pixels: recorded in the model's :class:`ModelInfo`.
        epochs, batch_size, lr, weight_decay: AdamW with a cosine schedule.
    """

    dataset: str
    build: Callable[[], nn.Module]
    num_classes: int
    input_size: tuple[int, ...]
    epochs: int
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    patch_grid: tuple[int, int] | None = None
    dataset_kwargs: dict[str, Any] = field(default_factory=dict)
    train_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def is_image(self) -> bool:
        return len(self.input_size) == 3

    def info(self, name: str) -> ModelInfo:
        channels = self.input_size[0]
        return ModelInfo(
            num_classes=self.num_classes,
            input_size=self.input_size,
            mean=(0.0,) * channels if self.is_image else None,
            std=(1.0,) * channels if self.is_image else None,
            patch_grid=self.patch_grid,
            name=f"reference:{name}",
        )


def _cluttered(build: Callable[[], nn.Module]) -> ReferenceSpec:
    """The cluttered-digits recipe (64×64 canvases, 4 training samples per digit) for the network ``build``."""
    return ReferenceSpec(
        "cluttered_digits",
        build,
        10,
        (1, 64, 64),
        epochs=15,
        dataset_kwargs={"canvas_size": 64},
        train_kwargs={"samples_per_digit": 4},
    )


REFERENCE_MODELS: dict[str, ReferenceSpec] = {
    "digits_cnn": ReferenceSpec("digits", lambda: SmallCNN(1, 10, 16), 10, (1, 32, 32), epochs=12),
    "digits_densenet": ReferenceSpec("digits", lambda: _densenet(1, 10), 10, (1, 32, 32), epochs=15),
    "digits_vit": ReferenceSpec(
        "digits", lambda: _vit(1, 10, 32), 10, (1, 32, 32), epochs=60, lr=2e-3, weight_decay=0.05, patch_grid=(8, 8)
    ),
    "cluttered_cnn": _cluttered(lambda: SmallCNN(1, 10, 16)),
    "cluttered_densenet": _cluttered(lambda: _densenet(1, 10)),
    "breast_cancer_mlp": ReferenceSpec(
        "breast_cancer", lambda: MLP(30, 2, (64, 64)), 2, (30,), epochs=60, batch_size=32, lr=1e-3
    ),
    "wine_mlp": ReferenceSpec("wine", lambda: MLP(13, 3, (64, 64)), 3, (13,), epochs=80, batch_size=16, lr=1e-3),
    "synthetic_mlp": ReferenceSpec(
        "synthetic", lambda: MLP(20, 3, (64, 64)), 3, (20,), epochs=40, batch_size=64, lr=1e-3
    ),
}


def default_cache_dir() -> Path:
    """``$RECALX_CACHE`` or ``~/.cache/recalx_lightning``."""
    return Path(os.environ.get("RECALX_CACHE") or Path.home() / ".cache" / "recalx_lightning")


def reference_spec(name: str) -> ReferenceSpec:
    """The spec of a reference model; unknown names get the closest known ones suggested."""
    if name not in REFERENCE_MODELS:
        close = difflib.get_close_matches(name, REFERENCE_MODELS, n=3, cutoff=0.4)
        hint = f" Did you mean {close}?" if close else ""
        raise ValueError(f"unknown reference model {name!r}; known: {sorted(REFERENCE_MODELS)}.{hint}")
    return REFERENCE_MODELS[name]


def _paths(name: str, cache_dir: str | os.PathLike | None) -> tuple[Path, Path]:
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = folder / "reference"
    return folder / f"{name}.pt", folder / f"{name}.json"


def _fingerprint(name: str, spec: ReferenceSpec, seed: int, epochs: int, max_train_samples: int | None) -> str:
    """Identifies the training recipe, so a cache trained differently (e.g. a short test run) is not reused."""
    recipe = [_FORMAT_VERSION, name, spec.dataset, spec.dataset_kwargs, spec.train_kwargs, spec.input_size]
    recipe += [spec.batch_size, spec.lr, spec.weight_decay, seed, epochs, max_train_samples]
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _build(name: str, spec: ReferenceSpec) -> nn.Module:
    model = spec.build()
    set_model_info(model, spec.info(name))
    return model


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, dataset, batch_size: int = 256) -> float:
    """Share of correctly classified samples of a ``(input, label)`` dataset."""
    model.eval()
    correct = total = 0
    for x, y in DataLoader(dataset, batch_size=batch_size):
        correct += int((model(x).argmax(-1) == y).sum())
        total += len(y)
    return correct / max(total, 1)


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


def train_reference_model(
    name: str,
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    epochs: int | None = None,
    max_train_samples: int | None = None,
    save: bool = True,
    verbose: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train a reference model from the embedded data; returns ``(model in eval mode, record)``.

    ``epochs`` and ``max_train_samples`` shorten training (tests); the record (saved as JSON next to the
    weights when ``save``) holds val/test accuracy, seed, timing, recipe fingerprint and library versions.
    """
    import sklearn
    import timm

    spec = reference_spec(name)
    epochs = spec.epochs if epochs is None else int(epochs)
    if epochs < 1:
        raise ValueError(f"`epochs` must be >= 1, got {epochs}.")
    train = make_dataset(spec.dataset, "train", seed=0, **spec.dataset_kwargs, **spec.train_kwargs)
    if max_train_samples is not None:
        train = Subset(train, range(min(int(max_train_samples), len(train))))
    torch.manual_seed(seed)
    model = _build(name, spec)
    loader = DataLoader(train, batch_size=spec.batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=spec.lr, total_steps=epochs * len(loader), pct_start=0.15
    )
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        running = 0.0
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            running += float(loss.detach()) * len(y)
        if verbose:
            print(f"  {name} epoch {epoch + 1}/{epochs}: train loss {running / len(train):.4f}", flush=True)
    seconds = time.perf_counter() - start
    model.eval()
    record = {
        "name": name,
        "accuracy": {
            split: evaluate_accuracy(model, make_dataset(spec.dataset, split, seed=0, **spec.dataset_kwargs))
            for split in ("train", "val", "test")
        },
        "train_seconds": round(seconds, 2),
        "threads": torch.get_num_threads(),
        "seed": seed,
        "epochs": epochs,
        "max_train_samples": max_train_samples,
        "fingerprint": _fingerprint(name, spec, seed, epochs, max_train_samples),
        "info": spec.info(name).to_dict(),
        "versions": {"torch": torch.__version__, "timm": timm.__version__, "sklearn": sklearn.__version__},
    }
    if save:
        weights, meta = _paths(name, cache_dir)
        _write_atomic(weights, lambda p: torch.save(model.state_dict(), p))
        _write_atomic(meta, lambda p: p.write_text(json.dumps(record, indent=2)))
    return model, record


def load_reference_model(
    name: str,
    cache_dir: str | os.PathLike | None = None,
    train_if_missing: bool = True,
    seed: int = 0,
) -> nn.Module:
    """The reference model ``name`` in eval mode, from the cache or (``train_if_missing``) trained now.

    A cache entry whose recipe fingerprint differs from the current recipe (e.g. a shortened test run) is
    treated as missing.
    """
    spec = reference_spec(name)
    weights, meta = _paths(name, cache_dir)
    expected = _fingerprint(name, spec, seed, spec.epochs, None)
    cached = False
    if weights.is_file() and meta.is_file():
        try:
            cached = json.loads(meta.read_text()).get("fingerprint") == expected
        except (OSError, json.JSONDecodeError):
            cached = False
    if cached:
        model = _build(name, spec)
        load_checked_state_dict(model, weights)
        return model.eval()
    if not train_if_missing:
        raise FileNotFoundError(
            f"reference model {name!r} is not cached under {str(weights.parent)!r}; train it with "
            f"`python -m recalx_lightning.models.reference train {name}` or pass train_if_missing=True."
        )
    model, _ = train_reference_model(name, cache_dir, seed=seed)
    return model


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``train NAME [NAME ...] | all`` and ``list``."""
    parser = argparse.ArgumentParser(prog="python -m recalx_lightning.models.reference", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train reference models and report their accuracy")
    train.add_argument("names", nargs="+", help=f"'all' or any of {sorted(REFERENCE_MODELS)}")
    train.add_argument("--cache-dir", default=None, help="default: $RECALX_CACHE or ~/.cache/recalx_lightning")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for these models)")
    train.add_argument("--quiet", action="store_true")
    sub.add_parser("list", help="list the reference models")
    args = parser.parse_args(argv)
    if args.command == "list":
        for name, spec in REFERENCE_MODELS.items():
            print(f"{name:20s} dataset={spec.dataset:18s} input={spec.input_size} epochs={spec.epochs}")
        return 0
    names = sorted(REFERENCE_MODELS) if args.names == ["all"] else args.names
    for name in names:
        reference_spec(name)
    torch.set_num_threads(args.threads)
    for name in names:
        _, record = train_reference_model(name, args.cache_dir, seed=args.seed, verbose=not args.quiet)
        acc = record["accuracy"]
        print(
            f"{name}: train {acc['train']:.4f}  val {acc['val']:.4f}  test {acc['test']:.4f}  "
            f"({record['train_seconds']:.1f} s, {record['threads']} thread(s))",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
