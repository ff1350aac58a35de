"""E2B's REST shapes: errors, sandbox objects, template names, pagination tokens.

Translation only: every value comes from a :class:`~corral.models.SandboxInfo` the service returned. Field names
and required fields follow E2B's OpenAPI document as the ``e2b`` SDK parses it (``Sandbox``, ``SandboxDetail``,
``ListedSandbox``, ``Error``); an optional field the SDK would misread is left out rather than guessed.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import math
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.utils import generate_unique_id
from starlette.exceptions import HTTPException as StarletteHTTPException

from corral.core.code_template import CODE_INTERPRETER_TEMPLATE
from corral.core.settings import Settings
from corral.errors import CorralError, InvalidRequest, NotFound
from corral.models import SandboxInfo, SandboxState
from corral.server.e2b.network import e2b_network

__all__ = [
    "CLIENT_ID",
    "ENVD_VERSION",
    "E2BRoute",
    "after_token",
    "corral_template",
    "detail",
    "e2b_error",
    "e2b_router",
    "listed",
    "operation_id",
    "page_token",
    "sandbox",
    "visible",
]

# The envd version the SDK is told: it gates SDK features (e2b/envd/versions.py), and 0.6.x enables all of them
# (file metadata, recursive watch, octet-stream uploads, close_stdin). The in-sandbox API (server/e2b/envd)
# implements what that version promises.
ENVD_VERSION = "0.6.13"
CLIENT_ID = "corral"  # E2B's id of the node a sandbox runs on; the SDK only passes it through

# E2B's template names that are Corral templates under another name (E2B's code-interpreter SDK asks for this one)
_ALIASES = {"code-interpreter-v1": CODE_INTERPRETER_TEMPLATE}


def corral_template(name: str) -> str:
    """The Corral template an E2B ``templateID`` names (``base`` is ``base``; a snapshot id is its name)."""
    return _ALIASES.get(name, name)


def e2b_error(exc: CorralError) -> JSONResponse:
    """E2B's ``{"code": <HTTP status>, "message"}``, with the status the SDK maps to its own exceptions.

    A runtime or agent failure is 500, not Corral's 502/504: the SDK retries 502-504 on its own, and a create
    retried after a failure deep in a runtime would only fail again (or make a second sandbox).
    """
    status = exc.status if exc.status < 500 or exc.status == 501 else 500
    return JSONResponse({"code": status, "message": exc.message}, status_code=status)


class E2BRoute(APIRoute):
    """A route whose errors (including bad bodies and failed authentication) come back in E2B's shape."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except CorralError as exc:
                _count(request, exc)
                return e2b_error(exc)
            except StarletteHTTPException as exc:  # FastAPI's own, e.g. a body that is not JSON at all
                status = exc.status_code if 400 <= exc.status_code < 500 else 400
                return JSONResponse({"code": status, "message": str(exc.detail)}, status_code=status)
            except RequestValidationError as exc:
                problem = next(iter(exc.errors()), {"loc": (), "msg": "invalid request"})
                where = ".".join(str(p) for p in problem.get("loc", ()) if p != "body")
                err = InvalidRequest(f"{where}: {problem.get('msg')}" if where else str(problem.get("msg")))
                _count(request, err)
                return e2b_error(err)

        return route


def operation_id(route: APIRoute) -> str:
    """OpenAPI operation ids of E2B routes, apart from Corral's (both have a ``create`` of sandboxes)."""
    return "e2b_" + generate_unique_id(route)


def e2b_router() -> APIRouter:
    """A router for E2B routes: E2B's error shape, the ``e2b`` tag, their own operation ids."""
    return APIRouter(route_class=E2BRoute, tags=["e2b"], generate_unique_id_function=operation_id)


def _count(request: Request, exc: CorralError) -> None:
    state = getattr(request.app.state, "corral", None)
    if state is not None:
        state.metrics.errors.labels(exc.code).inc()


def visible(info: SandboxInfo) -> SandboxInfo:
    """A sandbox E2B calls existing: a stopped one is gone (E2B answers 404 for killed and expired sandboxes)."""
    if info.state is SandboxState.STOPPED:
        raise NotFound(f"sandbox {info.sandbox_id} not found")
    return info


def _time(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat().replace("+00:00", "Z")


def _end(info: SandboxInfo, now: float) -> float:
    # A paused sandbox's deadline is suspended (Corral keeps the time it had left, not an end time)
    return info.expires_at if info.expires_at is not None else now


def _ids(info: SandboxInfo) -> dict[str, Any]:
    return {
        "templateID": info.template,
        "alias": info.template,
        "sandboxID": info.sandbox_id,
        "clientID": CLIENT_ID,
        "envdVersion": ENVD_VERSION,
    }


def _common(info: SandboxInfo, settings: Settings, now: float) -> dict[str, Any]:
    return {
        **_ids(info),
        "startedAt": _time(info.created_at),
        "endAt": _time(_end(info, now)),
        "cpuCount": max(1, math.ceil(info.cpus)),
        "memoryMB": info.memory_mb,
        "diskSizeMB": settings.default_limits.disk_mb,
        "state": "paused" if info.state is SandboxState.PAUSED else "running",
        "metadata": dict(info.metadata),
    }


def sandbox(info: SandboxInfo, settings: Settings) -> dict[str, Any]:
    """E2B's ``Sandbox``: the answer of create, connect, resume and fork."""
    return {
        **_ids(info),
        "envdAccessToken": info.envd_access_token,
        # E2B's private ports: the SDK sends it to port traffic; public sandboxes need none
        "trafficAccessToken": None if info.public_ports else info.traffic_token,
        "domain": settings.e2b_sandbox_domain,  # None: the SDK keeps E2B_SANDBOX_URL / E2B_DOMAIN
    }


def detail(info: SandboxInfo, settings: Settings, now: float) -> dict[str, Any]:
    """E2B's ``SandboxDetail`` (get_info), with the egress policy the sandbox really has."""
    internet, network = e2b_network(info.network, info.public_ports)
    return {
        **_common(info, settings, now),
        "envdAccessToken": info.envd_access_token,
        "domain": settings.e2b_sandbox_domain,
        "allowInternetAccess": internet,
        "network": network,
        "lifecycle": {"onTimeout": "pause" if info.auto_pause else "kill", "autoResume": False},
    }


def listed(info: SandboxInfo, settings: Settings, now: float) -> dict[str, Any]:
    """E2B's ``ListedSandbox`` (list)."""
    return _common(info, settings, now)


def page_token(key: tuple[float, str]) -> str:
    """An opaque ``x-next-token``: where the next page starts (start time and id of the last item sent)."""
    return base64.urlsafe_b64encode(f"{key[0]!r}|{key[1]}".encode()).decode()


def after_token(token: str) -> tuple[float, str]:
    try:
        created, sep, sandbox_id = base64.urlsafe_b64decode(token.encode()).decode().partition("|")
        if not sep:
            raise ValueError(token)
        return float(created), sandbox_id
    except (ValueError, UnicodeDecodeError, binascii.Error) as exc:
        raise InvalidRequest("nextToken is not one this server returned; list again without it") from exc
