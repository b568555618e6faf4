"""Fail fast when hub weights cannot be fetched, with a message on how to use local weights instead."""

from __future__ import annotations

import contextlib
import functools
import os
import socket
from collections.abc import Iterator
from urllib.parse import urlparse


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be found locally and the hub is unreachable (or offline mode is on)."""


_HUB_MARKERS = (
    "hub",
    "internet connection",
    "offline",
    "failed to download",
    "local cache",
    "connection",
    "max retries",
)


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub endpoint accepts a TCP connection within ``timeout`` seconds."""
    try:
        from huggingface_hub import constants

        endpoint = urlparse(constants.ENDPOINT)
    except Exception:  # pragma: no cover - huggingface_hub is a timm dependency
        endpoint = urlparse("https://huggingface.co")
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def offline_if_unreachable(enabled: bool = True) -> Iterator[None]:
    """Switch huggingface_hub to offline mode (cached files still load) while the hub is unreachable.

    Without it a download retries for ~46 s before failing; offline it fails in well under a second.
    The probe (at most 3 s, once per process) runs only when ``enabled`` (weights are requested); set
    ``RECALX_SKIP_HUB_PROBE=1`` to skip it.
    """
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover
        yield
        return
    previous = constants.HF_HUB_OFFLINE
    if enabled and not previous and not os.environ.get("RECALX_SKIP_HUB_PROBE") and not hub_reachable():
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


def is_hub_error(err: BaseException) -> bool:
    """Heuristic: does this exception come from a failed hub download?"""
    text = f"{type(err).__name__} {err}".lower()
    return any(m in text for m in _HUB_MARKERS)


def weights_error(spec: str, err: BaseException, how: str) -> WeightsUnavailableError:
    """The error raised when ``spec`` needs hub weights that cannot be fetched; ``how`` explains local options."""
    return WeightsUnavailableError(
        f"cannot load pretrained weights for {spec!r}: the hub is unreachable or offline mode is on "
        f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', 'unset')}), and they are not in the local cache. "
        f"{how} Original error: {type(err).__name__}: {' '.join(str(err).split())[:300]}"
    )
