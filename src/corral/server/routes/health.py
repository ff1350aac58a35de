"""Liveness, readiness and metrics: unauthenticated, as probes and scrapers expect (bind the server to a
private address; the default is 127.0.0.1)."""

from __future__ import annotations

import anyio
from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from corral.errors import CorralError
from corral.server.app import State

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is up")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="The store answers and at least one runtime is usable")
async def readyz(state: State) -> JSONResponse:
    checks: dict[str, str] = {}
    try:
        with anyio.fail_after(5):
            await state.service.store.list_templates()
        checks["store"] = "ok"
    except (CorralError, TimeoutError) as exc:
        checks["store"] = f"failing: {exc}"
    usable = await state.service.usable_runtimes()
    checks["runtimes"] = ",".join(usable) if usable else "none usable"
    ready = checks["store"] == "ok" and bool(usable)
    return JSONResponse(
        {"status": "ready" if ready else "not ready", "checks": checks}, status_code=200 if ready else 503
    )


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(state: State) -> Response:
    return Response(await state.metrics.render(state.service), media_type="text/plain; version=0.0.4")
