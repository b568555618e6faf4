"""Settings and rendering shared by the benchmark scripts (the computations live in ``recalx_lightning``)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from recalx_lightning._format import fmt_ci
from recalx_lightning.explain import paired_bootstrap_ci

# per-image explanation scores: key → (table label, which direction is better)
METRIC_LABELS = {
    "loc": ("localization", "higher"),
    "pointing": ("pointing game", "higher"),
    "align_signed": ("Spearman signed", "higher"),
    "align_absolute": ("Spearman |φ|", "higher"),
    "align_positive": ("Spearman φ⁺", "higher"),
    "bg_abs": ("background share of |φ|", "lower"),
    "deletion_auc": ("deletion AUC", "lower"),
    "insertion_auc": ("insertion AUC", "higher"),
    "efficiency_gap": ("efficiency gap", "lower"),
}


def metrics(*keys: str) -> tuple[tuple[str, str, str], ...]:
    """``(key, label, better)`` of the named scores, in that order (the rows of a script's tables)."""
    return tuple((key, *METRIC_LABELS[key]) for key in keys)


def parse_settings(doc: str, **defaults: int | float | str) -> argparse.Namespace:
    """A benchmark's command line: one ``--name`` option per default (typed like it, ``_`` written ``-``);
    torch then runs on one thread, as every benchmark is measured."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in defaults.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    args = parser.parse_args()
    torch.set_num_threads(1)
    return args


def ci_dict(a: Tensor, b: Tensor, seed: int) -> dict:
    """Paired 95% bootstrap CI of mean(a − b) (2,000 resamples) as a JSON-ready dict."""
    r = paired_bootstrap_ci(a, b, num_resamples=2000, seed=seed)
    return {"diff": r.mean_difference, "low": r.low, "high": r.high, "pairs": r.num_pairs}


def nanmean(v: Tensor) -> float:
    return float(torch.nanmean(v.double()))


def fmt_diff(c: dict, digits: int = 3) -> str:
    return fmt_ci(c["diff"], c["low"], c["high"], digits)


def summarize(name: str, values: dict[str, Tensor], reference: dict[str, Tensor] | None) -> str:
    """One console line: the mean localization and background shares of a variant, with the paired CI of the
    difference to ``reference``."""
    line = f"{name:<22}"
    for key in ("loc", "bg_abs", "bg_signed"):
        v = values[key]
        mean = float(torch.nanmean(v))
        if reference is None or values is reference:
            line += f"  {key}={mean:+.4f}{'':26}"
        else:
            ci = paired_bootstrap_ci(v, reference[key])
            line += f"  {key}={mean:+.4f} (Δ {ci.mean_difference:+.4f} [{ci.low:+.4f}, {ci.high:+.4f}])"
    return line


def table_lines(header: Sequence[str], separator: str, rows: Iterable[Sequence[object]]) -> list[str]:
    """A Markdown table: the ``header`` row, the ``separator`` line (e.g. ``"|---|---:|"``), one line per row."""
    return ["| " + " | ".join(header) + " |", separator, *("| " + " | ".join(map(str, row)) + " |" for row in rows)]


def to_jsonable(obj):
    """Tensors as lists, non-finite floats as ``None``, keys as strings (for ``json.dumps``)."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Tensor):
        return obj.tolist()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
