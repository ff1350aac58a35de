"""The ASGI app: wiring, authentication, error bodies, access logs, metrics and the owned background tasks.

``create_app(settings, service=…)`` builds everything from arguments (DESIGN §5: no module-level state), so a
test can run several apps side by side over a fake runtime or a real one. The lifespan owns one task group:
the reaper runs there and stops with the app.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Annotated

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from corral.core.auth import AuthService, Principal
from corral.core.service import SandboxService
from corral.core.settings import Settings
from corral.errors import CorralError, InvalidRequest, PermissionDenied
from corral.ids import KeyId, TenantId, new_request_id
from corral.server._asgi import send_error
from corral.server.e2b.envd import Watchers
from corral.server.e2b.sandbox_host import E2BSandboxHost
from corral.server.metrics import Metrics
from corral.server.proxy import PortProxy
from corral.wiring import open_service

__all__ = ["AppState", "Caller", "TenantCaller", "create_app"]

log = logging.getLogger("corral.server")
access_log = logging.getLogger("corral.server.access")

BOOTSTRAP_KEY_ID = KeyId("key-bootstrapadminaa")  # the principal of CORRAL_ADMIN_KEY
SHUTDOWN_TEARDOWN_WAIT = 10.0  # seconds a stopping server spends finishing deferred teardowns


@dataclass(frozen=True, kw_only=True)
class AppState:
    settings: Settings
    service: SandboxService
    auth: AuthService
    metrics: Metrics


def _state(request: HTTPConnection) -> AppState:
    state: AppState = request.app.state.corral
    return state


async def _principal(request: HTTPConnection) -> Principal:
    state = _state(request)
    header = request.headers.get("authorization", "")
    token = header[7:].strip() if header[:7].lower() == "bearer " else request.headers.get("x-api-key")
    admin_key = state.settings.admin_key
    if token and admin_key and hmac.compare_digest(token.encode(), admin_key.encode()):
        principal = Principal(key_id=BOOTSTRAP_KEY_ID, tenant_id=None)
    else:
        principal = await state.auth.authenticate(token)
    request.scope.setdefault("corral", {})["principal"] = principal
    return principal


async def _tenant(principal: Annotated[Principal, Depends(_principal)]) -> TenantId:
    if principal.tenant_id is None:
        raise PermissionDenied(
            "admin keys manage tenants, keys and the audit log; use a tenant's key to work with sandboxes"
        )
    return principal.tenant_id


async def _admin(principal: Annotated[Principal, Depends(_principal)]) -> Principal:
    if not principal.admin:
        raise PermissionDenied("this needs an admin key (corral keys create --admin)")
    return principal


Caller = Annotated[Principal, Depends(_admin)]
TenantCaller = Annotated[TenantId, Depends(_tenant)]


def error_response(exc: CorralError, state: AppState | None) -> JSONResponse:
    if state is not None:
        state.metrics.errors.labels(exc.code).inc()
    return JSONResponse(exc.to_wire(), status_code=exc.status)


def _install_error_handlers(app: FastAPI) -> None:
    def state_of(request: Request) -> AppState | None:
        return getattr(request.app.state, "corral", None)

    @app.exception_handler(CorralError)
    async def corral_error(request: Request, exc: CorralError) -> JSONResponse:
        return error_response(exc, state_of(request))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            {"field": ".".join(str(p) for p in e.get("loc", ()) if p != "body"), "problem": e.get("msg", "")}
            for e in exc.errors()
        ]
        first = problems[0] if problems else {"field": "", "problem": "invalid request"}
        where = f"{first['field']}: " if first["field"] else ""
        return error_response(
            InvalidRequest(f"{where}{first['problem']}", details={"problems": problems[:20]}),
            state_of(request),
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(
            exc.status_code, "invalid_request"
        )
        body = {"error": {"code": code, "message": str(exc.detail), "details": {}}}
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        rid = request.scope.get("corral", {}).get("request_id", "")
        log.exception("unhandled error", extra={"request_id": rid})
        body = {"error": {"code": "internal", "message": f"internal error (request {rid})", "details": {}}}
        return JSONResponse(body, status_code=500)


class _Edge:
    """Pure ASGI middleware (streaming-safe): request ids, JSON body size limit, access log, HTTP metrics."""

    def __init__(self, app: ASGIApp, *, max_body: int, metrics: Callable[[], Metrics | None]) -> None:
        self.app = app
        self.max_body = max_body
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = new_request_id()
        scope.setdefault("corral", {})["request_id"] = rid
        started = time.perf_counter()
        status = 0
        method = scope["method"]
        # Uploads stream into the sandbox (bounded by max_file_bytes there); everything else is small JSON.
        limited = not (method == "PUT" and scope["path"].endswith("/files")) and not scope["path"].endswith(
            "/stdin"
        )
        length = dict(scope.get("headers") or []).get(b"content-length")
        if limited and length is not None and length.isdigit() and int(length) > self.max_body:
            await send_error(send, 413, "too_large", f"request bodies are limited to {self.max_body} bytes")
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if limited and message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise _TooLarge
            return message

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", []).append((b"x-request-id", rid.encode()))
                m = self.metrics()
                if m is not None:
                    route = _route_name(scope)
                    m.request_seconds.labels(method, route).observe(time.perf_counter() - started)
            await send(message)

        try:
            await self.app(scope, counted, sending)
        except _TooLarge:
            if status == 0:
                await send_error(
                    send, 413, "too_large", f"request bodies are limited to {self.max_body} bytes"
                )
                status = 413
        finally:
            m = self.metrics()
            route = _route_name(scope)
            if m is not None:
                m.requests.labels(method, route, str(status)).inc()
            principal = scope.get("corral", {}).get("principal")
            access_log.info(
                "request",
                extra={
                    "request_id": rid,
                    "method": method,
                    "route": route,
                    "status": status,
                    "http_version": scope.get(
                        "http_version"
                    ),  # "2" under corral serve --http2 (server/run.py)
                    "duration_ms": round((time.perf_counter() - started) * 1000, 2),
                    "tenant_id": principal.tenant_id if principal else None,
                    "key_id": principal.key_id if principal else None,
                },
            )


class _TooLarge(Exception):
    pass


def _route_name(scope: Scope) -> str:
    route = scope.get("route")
    return getattr(route, "path", "unmatched")


def create_app(
    settings: Settings,
    *,
    service: SandboxService | None = None,
    run_background: bool = True,
) -> FastAPI:
    """The Corral API. ``service`` defaults to :func:`corral.wiring.open_service`; the app closes what it built."""
    from corral.server import dashboard, e2b
    from corral.server.routes import (
        admin,
        code,
        events,
        files,
        health,
        pools,
        ports,
        processes,
        sandboxes,
        templates,
        terminals,
        unary,
    )

    owned = service is None
    svc = service if service is not None else open_service(settings)
    state = AppState(settings=settings, service=svc, auth=AuthService(svc.store), metrics=Metrics())
    watchers = Watchers()  # the E2B adapter's server-side directory watchers

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with anyio.create_task_group() as tg:
            tg.start_soon(watchers.run)
            if run_background:
                tg.start_soon(svc.run_reaper)
                tg.start_soon(svc.run_sampler)
                tg.start_soon(svc.pools.run)
            log.info(
                "corral server ready", extra={"store": type(getattr(svc.store, "inner", svc.store)).__name__}
            )
            try:
                yield
            finally:
                tg.cancel_scope.cancel()
        if run_background:  # the reaper is gone: a stopping server finishes the teardowns the kernel held up
            with anyio.CancelScope(shield=True):
                left = await svc.finish_teardowns(wait=SHUTDOWN_TEARDOWN_WAIT)
            if left:
                log.warning("%d sandbox teardowns are still pending; the next start finishes them", left)
        if owned:
            await svc.aclose()
            await svc.store.aclose()

    app = FastAPI(
        title="Corral",
        version="1",
        summary="Sandboxes for AI agents: namespaces, gVisor and microVMs behind one API.",
        lifespan=lifespan,
    )
    app.state.corral = state
    _install_error_handlers(app)
    for module in (
        health,
        events,
        sandboxes,
        unary,
        processes,
        terminals,
        files,
        ports,
        code,
        templates,
        pools,
        admin,
    ):
        app.include_router(module.router)
    app.include_router(code.templates_router)
    e2b.install(app)  # E2B's REST control plane, over the same service
    app.include_router(dashboard.router)
    app.add_middleware(_Edge, max_body=settings.max_request_bytes, metrics=lambda: state.metrics)
    # outermost: sandbox-port traffic never meets the API's body limit, auth or access log
    app.add_middleware(PortProxy, service=svc, metrics=lambda: state.metrics)
    # E2B's SDK names sandboxes by E2b-Sandbox-* headers or {port}-{id} host names: before Corral's proxy
    app.add_middleware(
        E2BSandboxHost,
        service=svc,
        watchers=watchers,
        metrics=lambda: state.metrics,
        domain=settings.e2b_domain,
    )
    return app


def app_state(request: Request) -> AppState:
    return _state(request)


State = Annotated[AppState, Depends(app_state)]
