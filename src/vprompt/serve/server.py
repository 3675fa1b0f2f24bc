"""Start the HTTP service: check the ``serve`` extra, load the tasks, run uvicorn.

Nothing here imports FastAPI or uvicorn at module level, so `vprompt.cli` imports without the
``serve`` extra.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import logging
import os
import socket
import sys
from collections.abc import Mapping

from vprompt.errors import VPromptError
from vprompt.serve.multitask import MultiTaskModel
from vprompt.serve.settings import ServeSettings

log = logging.getLogger("vprompt.serve")

SERVE_MODULES = {"fastapi": "fastapi", "uvicorn": "uvicorn", "python-multipart": "python_multipart"}
"""Distribution -> module the HTTP service imports."""


class MissingExtraError(VPromptError):
    """An optional dependency group is not installed."""


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a module set to None in sys.modules, a broken package
        return False


def require_serve_extra() -> None:
    """Raise `MissingExtraError` naming ``pip install 'vprompt[serve]'`` if a module is missing."""
    missing = [
        dist
        for dist, module in SERVE_MODULES.items()
        if not _installed(module) and not (module == "python_multipart" and _installed("multipart"))
    ]
    if missing:
        raise MissingExtraError(
            f"the HTTP server needs {', '.join(missing)}, which are not installed; install the "
            "serve extra: pip install 'vprompt[serve]'"
        )


def configure_logging(level: str = "info") -> None:
    """Send ``vprompt.*`` log records to stderr in uvicorn's style."""
    logger = logging.getLogger("vprompt")
    if not any(getattr(h, "_vprompt", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)-9s %(name)s: %(message)s"))
        handler._vprompt = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: any free port)."""
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise VPromptError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def run_server(
    model: MultiTaskModel,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    settings: ServeSettings | None = None,
    refused: Mapping[str, str] | None = None,
    log_level: str = "info",
    access_log: bool = True,
) -> None:
    """Serve ``model`` over HTTP until interrupted.

    Prints ``vprompt serve: listening on http://HOST:PORT`` once the socket accepts connections
    (with ``port=0`` this is how to learn the port).
    """
    require_serve_extra()
    import uvicorn

    from vprompt.serve.app import create_app

    if not is_loopback(host):
        log.warning(
            "listening on %s: anyone who can reach it can run predictions, and add or remove "
            "tasks from directories this process can read",
            host,
        )
    if len(model) == 0:
        log.warning(
            "no task loaded (%s): the server answers 404 to every predict until one is added "
            "with POST /v1/tasks",
            "all refused, see above" if refused else "none given",
        )
    app = create_app(model, settings, dict(refused or {}))
    sock = bind_socket(host, port)
    bound = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level=log_level, access_log=access_log, lifespan="on")
    server = uvicorn.Server(config)
    shown = f"[{host}]" if ":" in host else host
    print(
        f"vprompt serve: listening on http://{shown}:{bound} with {len(model)} task(s) "
        f"(docs: http://{shown}:{bound}/docs, pid {os.getpid()})",
        flush=True,
    )
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
