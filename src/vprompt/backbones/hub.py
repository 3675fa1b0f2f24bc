"""``timm:NAME`` models: pretrained weights from the Hugging Face Hub, failing fast when offline.

Without a network, huggingface_hub retries for about a minute before giving up. vprompt avoids
that: when ``HF_HUB_OFFLINE`` is set (read at call time, not at import) or a 3-second probe of
the Hub fails, the download runs in huggingface_hub's offline mode, which serves the local cache
and otherwise fails at once.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from torch import nn

from vprompt.errors import BackboneError

PROBE_TIMEOUT_S = 3.0
_TRUE = {"1", "true", "yes", "on"}
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def offline_requested() -> bool:
    """True when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set now or was at import."""
    env = (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").lower()
    if env in _TRUE:
        return True
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - timm depends on huggingface_hub
        return False
    return bool(constants.HF_HUB_OFFLINE)


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the Hub endpoint opens within ``timeout`` seconds.

    Behind a proxy the direct probe says nothing, so it is skipped (reported reachable).
    """
    if any(os.environ.get(v) for v in _PROXY_VARS):
        return True
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    ok: list[bool] = []

    def probe() -> None:  # getaddrinfo has no timeout of its own, hence the thread
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=timeout):
            ok.append(True)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(ok)


@contextlib.contextmanager
def _hub_offline_mode() -> Iterator[None]:
    """Run huggingface_hub in offline mode (cache only, no retries) for the duration."""
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def create_pretrained(name: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, pretrained=True, **kwargs)``, failing within seconds when offline.

    Raises:
        BackboneError: the weights are neither reachable nor in the local cache.
    """
    import timm

    offline = offline_requested() or not hub_reachable()
    if not offline:
        try:
            return timm.create_model(name, pretrained=True, **kwargs)
        except OSError as e:
            raise BackboneError(_offline_message(name, reason=f"the download failed ({e})")) from e
    _check_url_source_cached(name)
    try:
        with _hub_offline_mode():
            return timm.create_model(name, pretrained=True, **kwargs)
    except OSError as e:
        reason = (
            "HF_HUB_OFFLINE is set"
            if offline_requested()
            else "the Hugging Face Hub is unreachable"
        )
        raise BackboneError(
            _offline_message(name, reason=f"{reason} and they are not in the local cache")
        ) from e


def _check_url_source_cached(name: str) -> None:
    """Models whose weights come from a plain URL (not the Hub) must already be in torch's cache."""
    import torch.hub
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None or cfg.hf_hub_id or cfg.file or not cfg.url:
        return
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(cfg.url).path).name
    if not cached.is_file():
        raise BackboneError(
            _offline_message(name, reason=f"the network is off and {cached} does not exist")
        )


def _offline_message(name: str, reason: str) -> str:
    arch = name.split(".")[0]
    return (
        f"Cannot load pretrained weights for timm:{name}: {reason}. Offline, use a local "
        f"checkpoint with 'file:PATH#{arch}', an offline zoo entry with 'zoo:NAME' (see "
        f"`vprompt zoo list`), or random weights with 'timm:{name}?pretrained=false'."
    )
