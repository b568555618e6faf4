"""Numbers in tables: the one formatter of the report, the explain summaries and the benchmark write-ups."""

from __future__ import annotations

import math


def fmt(value: float | None, spec: str = ".4f", suffix: str = "") -> str:
    """``format(value, spec) + suffix``, or "–" for a missing value (None or NaN)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(value, spec) + suffix


def fmt_ci(diff: float, low: float, high: float, digits: int = 3) -> str:
    """A paired difference with its confidence interval, ``+0.012 [+0.004, +0.020]*``; the star marks an interval
    that excludes 0."""
    star = "" if low <= 0 <= high else "*"
    return f"{fmt(diff, f'+.{digits}f')} [{fmt(low, f'+.{digits}f')}, {fmt(high, f'+.{digits}f')}]{star}"
