"""E2B's REST control plane for sandboxes, over the same SandboxService as Corral's own routes.

Each route parses E2B's request, calls the service for the caller's tenant (the API key in ``X-API-Key``) and
answers in E2B's shape; no sandbox semantics live here. Where E2B and Corral differ, the difference is a rule
of translation written down at the route:

- a stopped (killed or expired) sandbox does not exist for E2B: get, kill, timeout, pause and connect answer 404;
- connect may extend a sandbox's end time and never shortens it; it resumes a paused sandbox (201, not 200);
- ``secure`` is accepted and always on: every sandbox has an ``envdAccessToken``;
- ``autoPause`` (the SDK's ``lifecycle={"on_timeout": "pause"}``) pauses the sandbox at its timeout; connect
  resumes it. Auto-resume on traffic is not there yet;
- ``allow_internet_access`` and ``network`` become a Corral egress policy (:mod:`.network`, which says how,
  and why a create that makes no choice gets the server's ``[e2b] internet_by_default``); get_info reports the
  policy the sandbox really has, and ``update_network`` replaces it in place;
- what Corral cannot do yet (auto-resume, MCP, IAM, volumes, E2B's egress proxy and header rules) is refused
  with a message that says so, rather than accepted and silently dropped.
"""

from __future__ import annotations

import datetime
import time
import urllib.parse
from typing import Annotated, Any

from fastapi import Header, Query, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from corral.core.service import SandboxService
from corral.core.settings import Settings
from corral.errors import Conflict, InvalidRequest, Unsupported
from corral.ids import TenantId
from corral.models import CreateParams, SandboxInfo, SandboxState
from corral.server.app import State, TenantCaller
from corral.server.e2b._wire import (
    after_token,
    corral_template,
    detail,
    e2b_router,
    listed,
    page_token,
    sandbox,
    visible,
)
from corral.server.e2b.network import UPDATABLE_NONE, corral_policy, refuse

__all__ = ["router"]

router = e2b_router()

DEFAULT_TIMEOUT = 300  # seconds: E2B's documented default for create and connect
MAX_PAGE = 1000


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # newer SDKs send fields this server has not heard of


Seconds = Annotated[int, Field(ge=0)]
StrMap = dict[Annotated[str, Field(max_length=256)], Annotated[str, Field(max_length=32768)]]


class NewSandbox(_Body):
    templateID: Annotated[str, Field(min_length=1, max_length=128)]
    timeout: Seconds = DEFAULT_TIMEOUT
    metadata: StrMap | None = None
    envVars: StrMap | None = None
    secure: bool | None = None  # always on: every sandbox has an envd access token
    allow_internet_access: bool | None = None  # see the module docstring
    autoPause: bool | None = None
    autoResume: dict[str, Any] | None = None
    network: dict[str, Any] | None = None
    mcp: dict[str, Any] | None = None
    iam: dict[str, Any] | None = None
    volumeMounts: list[Any] | None = None

    def params(self, settings: Settings, idempotency_key: str | None = None) -> CreateParams:
        refuse(
            {
                "autoResume": bool((self.autoResume or {}).get("enabled")),
                "mcp": bool(self.mcp),
                "iam": bool(self.iam),
                "volumeMounts": bool(self.volumeMounts),
            },
            "its sandboxes are resumed by connect only, and have no MCP gateway, workload identity or volumes; "
            "leave these options unset",
        )
        network = corral_policy(
            self.network, self.allow_internet_access, internet_by_default=settings.e2b_internet_by_default
        )
        public = (self.network or {}).get("allowPublicTraffic", True)  # E2B's ports are public by default
        if not isinstance(public, bool):
            raise InvalidRequest("network.allowPublicTraffic must be true or false")
        return CreateParams(
            template=corral_template(self.templateID),
            timeout=self.timeout,
            metadata=self.metadata or {},
            env=self.envVars or {},
            public_ports=public,
            auto_pause=bool(self.autoPause),
            idempotency_key=idempotency_key,
            network=network,
        )


class Timeout(_Body):
    timeout: Seconds


class OptionalTimeout(_Body):
    timeout: Seconds | None = None


class Refresh(_Body):
    duration: Seconds = 0


class Fork(_Body):
    timeout: Seconds | None = None
    count: Annotated[int, Field(ge=1, le=16)] = 1


def _created(state: State, info: SandboxInfo, status: int = 201) -> JSONResponse:
    return JSONResponse(sandbox(info, state.settings), status_code=status)


@router.post("/sandboxes", status_code=201, summary="E2B: create a sandbox (v1)")
async def create_v1(body: NewSandbox, state: State, tenant: TenantCaller) -> JSONResponse:
    return _created(state, await state.service.create(body.params(state.settings), tenant=tenant))


@router.post("/v2/sandboxes", status_code=201, summary="E2B: create a sandbox")
async def create(
    body: NewSandbox,
    state: State,
    tenant: TenantCaller,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> JSONResponse:
    """``Idempotency-Key``: a retry of a create that already made a (still live) sandbox gets that sandbox."""
    params = body.params(state.settings, idempotency_key)
    return _created(state, await state.service.create(params, tenant=tenant))


async def _live(service: SandboxService, sandbox_id: str, tenant: TenantId) -> SandboxInfo:
    return visible(await service.get(sandbox_id, tenant=tenant))


async def _extend(
    service: SandboxService, info: SandboxInfo, seconds: float, tenant: TenantId
) -> SandboxInfo:
    """Make the sandbox live at least ``seconds`` from now; an end time already later is kept."""
    if info.expires_at is not None and info.expires_at >= time.time() + seconds:
        return info
    return await service.set_timeout(info.sandbox_id, seconds, tenant=tenant)


async def _connect(state: State, sandbox_id: str, timeout: float, tenant: TenantId) -> JSONResponse:
    info = await _live(state.service, sandbox_id, tenant)
    if info.state is SandboxState.PAUSED:  # with the time it had left, or the timeout asked for if longer
        return _created(state, await state.service.resume(sandbox_id, at_least=timeout, tenant=tenant))
    return _created(state, await _extend(state.service, info, timeout, tenant), 200)


@router.post("/sandboxes/{sandbox_id}/connect", summary="E2B: connect (resumes a paused sandbox) (v1)")
async def connect_v1(sandbox_id: str, body: Timeout, state: State, tenant: TenantCaller) -> JSONResponse:
    return await _connect(state, sandbox_id, body.timeout, tenant)


@router.post("/v2/sandboxes/{sandbox_id}/connect", summary="E2B: connect (resumes a paused sandbox)")
async def connect(
    sandbox_id: str, state: State, tenant: TenantCaller, body: OptionalTimeout | None = None
) -> JSONResponse:
    timeout = body.timeout if body is not None and body.timeout is not None else DEFAULT_TIMEOUT
    return await _connect(state, sandbox_id, timeout, tenant)


@router.post("/sandboxes/{sandbox_id}/resume", summary="E2B: resume a paused sandbox (SDKs up to 2.0)")
async def resume(
    sandbox_id: str, state: State, tenant: TenantCaller, body: OptionalTimeout | None = None
) -> JSONResponse:
    info = await _live(state.service, sandbox_id, tenant)
    if info.state is not SandboxState.PAUSED:
        raise Conflict(f"sandbox {sandbox_id} is already running")
    timeout = body.timeout if body is not None and body.timeout is not None else DEFAULT_TIMEOUT
    return _created(state, await state.service.resume(sandbox_id, at_least=timeout, tenant=tenant))


@router.get("/sandboxes/{sandbox_id}", summary="E2B: get a sandbox")
async def get(sandbox_id: str, state: State, tenant: TenantCaller) -> dict[str, Any]:
    return detail(await _live(state.service, sandbox_id, tenant), state.settings, time.time())


@router.delete("/sandboxes/{sandbox_id}", status_code=204, summary="E2B: kill a sandbox")
async def kill(sandbox_id: str, state: State, tenant: TenantCaller) -> Response:
    await _live(state.service, sandbox_id, tenant)  # an already stopped sandbox is 404, as in E2B
    await state.service.kill(sandbox_id, tenant=tenant)
    return Response(status_code=204)


@router.post(
    "/sandboxes/{sandbox_id}/timeout", status_code=204, summary="E2B: end the sandbox this long from now"
)
async def set_timeout(sandbox_id: str, body: Timeout, state: State, tenant: TenantCaller) -> Response:
    await _live(state.service, sandbox_id, tenant)
    await state.service.set_timeout(sandbox_id, body.timeout, tenant=tenant)
    return Response(status_code=204)


@router.post(
    "/sandboxes/{sandbox_id}/refreshes", status_code=204, summary="E2B: keep the sandbox alive longer"
)
async def refresh(
    sandbox_id: str, state: State, tenant: TenantCaller, body: Refresh | None = None
) -> Response:
    info = await _live(state.service, sandbox_id, tenant)
    seconds = body.duration if body is not None and body.duration else DEFAULT_TIMEOUT
    await _extend(state.service, info, seconds, tenant)
    return Response(status_code=204)


@router.post("/sandboxes/{sandbox_id}/pause", status_code=204, summary="E2B: pause (409 if already paused)")
async def pause(sandbox_id: str, state: State, tenant: TenantCaller) -> Response:
    info = await _live(state.service, sandbox_id, tenant)
    if info.state is SandboxState.PAUSED:
        raise Conflict(f"sandbox {sandbox_id} is already paused")
    await state.service.pause(sandbox_id, tenant=tenant)
    return Response(status_code=204)


@router.post("/sandboxes/{sandbox_id}/fork", status_code=201, summary="E2B: copies of a running sandbox")
async def fork(
    sandbox_id: str, state: State, tenant: TenantCaller, body: Fork | None = None
) -> list[dict[str, Any]]:
    body = body or Fork()
    await _live(state.service, sandbox_id, tenant)
    made = await state.service.fork(sandbox_id, body.count, tenant=tenant)
    if body.timeout is not None:
        made = [await state.service.set_timeout(i.sandbox_id, body.timeout, tenant=tenant) for i in made]
    return [{"sandbox": sandbox(info, state.settings)} for info in made]


class NetworkUpdate(_Body):
    allowOut: list[Any] | None = None
    denyOut: list[Any] | None = None
    allow_internet_access: bool | None = None
    dnsServers: list[Any] | None = None
    egressProxy: dict[str, Any] | None = None
    rules: dict[str, Any] | None = None


@router.put("/sandboxes/{sandbox_id}/network", status_code=204, summary="E2B: replace the egress rules")
async def update_network(
    sandbox_id: str, state: State, tenant: TenantCaller, body: NetworkUpdate | None = None
) -> Response:
    """E2B replaces every rule: a field left out is cleared (no rules at all is the server's E2B default)."""
    info = await _live(state.service, sandbox_id, tenant)
    body = body or NetworkUpdate()
    policy = corral_policy(
        body.model_dump(exclude={"allow_internet_access"}, exclude_none=True),
        body.allow_internet_access,
        internet_by_default=state.settings.e2b_internet_by_default,
        internet_is_a_choice=True,  # only newer SDKs update, and they send it only when asked
    )
    try:
        await state.service.update_network(sandbox_id, policy, tenant=tenant)
    except Unsupported as exc:
        if info.network != "none" or "rules" in exc.details:  # rules: these rules, not "none", are refused
            raise
        raise Unsupported(f"sandbox {sandbox_id} has no network to change: {UPDATABLE_NONE}") from exc
    return Response(status_code=204)


# -- listing ------------------------------------------------------------------------------------------------
def _metadata(query: str | None) -> dict[str, str] | None:
    """E2B's metadata filter: one query value holding ``k=v&k2=v2``, each key and value percent-encoded."""
    if not query:
        return None
    try:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError as exc:
        raise InvalidRequest("metadata must look like key=value&key2=value2 (URL-encoded)") from exc
    return {urllib.parse.unquote(k): urllib.parse.unquote(v) for k, v in pairs}


_STATES = {"running": SandboxState.RUNNING, "paused": SandboxState.PAUSED}


def _states(values: list[str]) -> frozenset[SandboxState] | None:
    names = [n.strip() for v in values for n in v.split(",") if n.strip()]
    unknown = sorted(set(names) - _STATES.keys())
    if unknown:
        raise InvalidRequest(f"state {unknown[0]!r} is not one of: running, paused")
    return frozenset(_STATES[n] for n in names) or None


def _since(value: str | None) -> datetime.datetime | None:
    """``startedAfter``, compared as the time E2B's SDK was shown: to the microsecond, as ``startedAt`` is."""
    if not value:
        return None
    try:
        when = datetime.datetime.fromisoformat(value)
    except ValueError as exc:
        raise InvalidRequest("startedAfter must be an RFC 3339 time, like 2026-12-02T06:00:00Z") from exc
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when


@router.get("/v2/sandboxes", summary="E2B: list sandboxes, filtered and one page at a time (x-next-token)")
async def list_v2(
    state: State,
    tenant: TenantCaller,
    metadata: Annotated[str | None, Query(max_length=16384)] = None,
    state_: Annotated[list[str], Query(alias="state")] = [],  # noqa: B006
    order: Annotated[str | None, Query(pattern="^(asc|desc)$")] = None,
    started_after: Annotated[str | None, Query(alias="startedAfter", max_length=64)] = None,
    template: Annotated[str | None, Query(max_length=128)] = None,
    next_token: Annotated[str | None, Query(alias="nextToken", max_length=512)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
) -> JSONResponse:
    found = await state.service.list_sandboxes(
        tenant=tenant, metadata=_metadata(metadata), states=_states(state_)
    )
    since = _since(started_after)
    if since is not None:
        found = [i for i in found if datetime.datetime.fromtimestamp(i.created_at, datetime.UTC) >= since]
    if template:
        found = [i for i in found if i.template == corral_template(template)]
    newest_first = order != "asc"  # E2B lists the newest first unless told otherwise
    found.sort(key=lambda i: (i.created_at, i.sandbox_id), reverse=newest_first)
    if next_token:  # the page starts after the last item of the one before, in the same order
        start = after_token(next_token)
        found = [
            i
            for i in found
            if (
                (i.created_at, i.sandbox_id) < start if newest_first else (i.created_at, i.sandbox_id) > start
            )
        ]
    page = found[:limit]
    now = time.time()
    headers = {}
    if len(found) > limit:
        headers["x-next-token"] = page_token((page[-1].created_at, page[-1].sandbox_id))
    return JSONResponse([listed(i, state.settings, now) for i in page], headers=headers)


@router.get("/sandboxes", summary="E2B: list running sandboxes (v1)")
async def list_v1(
    state: State,
    tenant: TenantCaller,
    metadata: Annotated[str | None, Query(max_length=16384)] = None,
) -> list[dict[str, Any]]:
    found = await state.service.list_sandboxes(
        tenant=tenant, metadata=_metadata(metadata), states=frozenset({SandboxState.RUNNING})
    )
    found.sort(key=lambda i: (i.created_at, i.sandbox_id))
    now = time.time()
    return [listed(i, state.settings, now) for i in found]
