"""Which ASGI server runs ``corral serve``, and how: the one place the CLI launches the app.

uvicorn by default: HTTP/1.1 (and WebSocket) only. With ``[server] http2`` (``CORRAL_SERVER_HTTP2``,
``--http2``) hypercorn runs the same app instead: on plain HTTP it speaks HTTP/1.1 and cleartext HTTP/2 on the
same port (h2c, by prior knowledge or by ``Upgrade: h2c``); with TLS (``[server] tls_cert``/``tls_key``) it
offers ``h2`` and ``http/1.1`` by ALPN. Connect-RPC clients (E2B's SDK to envd) and others that prefer HTTP/2
get it; HTTP/1.1 clients, WebSockets and the streamed responses work as before.

The two paths behave alike for whoever runs and supervises the server (tests/server/test_serve_http2.py
checks both): the same lifecycle log lines (``Started server process``, ``Application startup complete.``,
``Shutting down``, ``Application shutdown complete.``, ``Finished server process``; uvicorn's under
``uvicorn.error``, these under ``hypercorn.error``), SIGTERM and SIGINT end it gracefully (open connections
get :data:`GRACEFUL_SECONDS` to finish, then the app's lifespan shuts down) and the signal is raised again
once it has, with the disposition it had before the server started (uvicorn does that since 0.29: SIGTERM
ends the process by SIGTERM; the KeyboardInterrupt of SIGINT is swallowed, exit status 0), and a port that
cannot be bound is one error line and exit status 3.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from typing import Any, NoReturn

from corral.core.settings import Settings
from corral.server.tls import TlsFiles

__all__ = ["GRACEFUL_SECONDS", "WS_MAX_BYTES", "run"]

GRACEFUL_SECONDS = 5.0  # what open connections get to finish after SIGTERM/SIGINT
WS_MAX_BYTES = 8 * 1024 * 1024  # the largest WebSocket message a client may send
_STARTUP_FAILED = 3  # uvicorn's exit status when the app cannot start (or the port cannot be bound)

Scope = dict[str, Any]
ASGIApp = Any  # the FastAPI app; typed loosely so this module needs neither server's types


def run(app: ASGIApp, settings: Settings, files: TlsFiles | None) -> None:
    """Serve ``app`` on ``settings.host:port`` until SIGTERM or SIGINT (HTTPS with ``files``)."""
    if settings.http2:
        _hypercorn(app, settings, files)
    else:
        _uvicorn(app, settings, files)


def _uvicorn(app: ASGIApp, settings: Settings, files: TlsFiles | None) -> None:
    import uvicorn

    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        ssl_certfile=files.cert if files is not None else None,
        ssl_keyfile=files.key if files is not None else None,
        log_config=None,
        access_log=False,  # corral.server.access logs every request, with more fields
        timeout_graceful_shutdown=int(GRACEFUL_SECONDS),
        ws_max_size=WS_MAX_BYTES,
    )


# -- hypercorn -------------------------------------------------------------------------------------------------

log = logging.getLogger("hypercorn.error")


def _hypercorn(app: ASGIApp, settings: Settings, files: TlsFiles | None) -> None:
    from hypercorn.config import Config

    config = Config()
    config.errorlog = log  # through the root logger: corral's JSON or text format, --log-file
    config.accesslog = None  # corral.server.access logs every request
    config.graceful_timeout = GRACEFUL_SECONDS
    config.websocket_max_message_size = WS_MAX_BYTES
    config.alpn_protocols = ["h2", "http/1.1"]
    if files is not None:
        config.certfile, config.keyfile = str(files.cert), str(files.key)
    log.info("Started server process [%d]", os.getpid())
    # bound before the app starts: a port in use is an error line, not a traceback after start-up
    config.bind = [f"fd://{_bind(settings.host, settings.port).detach()}"]  # hypercorn owns it now
    received: list[int] = []
    try:
        asyncio.run(_serve(_LifespanLog(app), config, received))
    except _StartupFailed:
        log.error("Application startup failed. Exiting.")
        sys.exit(_STARTUP_FAILED)
    log.info("Finished server process [%d]", os.getpid())
    # as uvicorn does: the signal's own action, now that all is closed; uvicorn.run swallows KeyboardInterrupt
    with contextlib.suppress(KeyboardInterrupt):
        for sig in reversed(received):
            signal.raise_signal(sig)


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound as uvicorn binds (the first address of ``host``; IPv6 only for ``::``)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        _bind_failed(exc, host, port)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        _bind_failed(exc, host, port)
    return sock


def _bind_failed(exc: OSError, host: str, port: int) -> NoReturn:
    reason = (exc.strerror or str(exc)).lower()
    log.error("[Errno %s] error while attempting to bind on address %r: %s", exc.errno, (host, port), reason)
    sys.exit(_STARTUP_FAILED)


class _StartupFailed(Exception):
    pass


async def _serve(app: ASGIApp, config: Any, received: list[int]) -> None:
    from hypercorn.asyncio import serve
    from hypercorn.utils import LifespanFailureError, LifespanTimeoutError

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(sig: int) -> None:
        if not received:
            log.info("Shutting down")
        received.append(sig)
        stop.set()

    signals = (signal.SIGINT, signal.SIGTERM)
    before = {sig: signal.getsignal(sig) for sig in signals}  # restored after: the re-raise does what it did
    for sig in signals:
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        await serve(app, config, shutdown_trigger=stop.wait, mode="asgi")
    except LifespanFailureError as exc:  # the app's own message is logged already (_LifespanLog)
        raise _StartupFailed from exc
    except LifespanTimeoutError as exc:
        log.error("%s", exc)
        raise _StartupFailed from exc
    except Exception:  # ExceptionGroup too
        if not received:
            raise
        # Shutting down, after the grace period: hypercorn 0.18 cancels the streams still open, and one that is
        # an HTTP/2 stream can raise out of serve() ("TaskGroup ... is shutting down"); the app's lifespan has
        # shut down already. As uvicorn does, the stragglers are closed and the server ends.
        log.warning("Open connections closed after the %g s grace period", GRACEFUL_SECONDS)
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)  # (which installs Python's defaults, not what was there)
            if before[sig] is not None:
                signal.signal(sig, before[sig])


class _LifespanLog:
    """The app, with uvicorn's lifespan log lines around its start-up and shutdown."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def logged_receive() -> Any:
            message = await receive()
            kind = message.get("type")
            if kind == "lifespan.startup":
                log.info("Waiting for application startup.")
            elif kind == "lifespan.shutdown":
                log.info("Waiting for application shutdown.")
            return message

        async def logged_send(message: Any) -> None:
            kind = message.get("type")
            if kind == "lifespan.startup.complete":
                log.info("Application startup complete.")
            elif kind == "lifespan.shutdown.complete":
                log.info("Application shutdown complete.")
            elif kind in ("lifespan.startup.failed", "lifespan.shutdown.failed"):
                log.error("%s", message.get("message", ""))
            await send(message)

        await self.app(scope, logged_receive, logged_send)
