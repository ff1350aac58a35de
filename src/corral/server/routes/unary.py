"""The REST routes of the op table (corral/ops.py): one generic endpoint per row, calling the service function
the row names with the caller's tenant. The wire (paths, bodies, status codes, OpenAPI) is what the
hand-written routes served before."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response

from corral.models import SandboxInfo
from corral.ops import OPS, Op
from corral.server import schemas
from corral.server.app import AppState, State, TenantCaller

router = APIRouter()


def present(state: AppState, value: Any) -> dict[str, Any]:
    """An answer as the API shows it: a sandbox with the domain its ports are served under by this server."""
    if isinstance(value, SandboxInfo):
        value = dataclasses.replace(value, domain=state.settings.ports_domain)
    return value.to_wire()  # type: ignore[no-any-return]


def _endpoint(op: Op[Any]) -> Any:
    async def endpoint(**kw: Any) -> Any:
        state: AppState = kw.pop("state")
        tenant = kw.pop("tenant")
        body = kw.pop("body", None)
        if body is not None:
            if op.whole is not None:
                kw[op.whole] = body.params()
            else:
                kw.update(op.service_args(body.model_dump(exclude_none=True)))
        value = await getattr(state.service, op.name)(**kw, tenant=tenant)
        if op.answer is None:
            return Response(status_code=op.status)
        if op.many is not None:
            return {op.many: [present(state, v) for v in value]}
        return present(state, value)

    kind = inspect.Parameter.KEYWORD_ONLY
    params = [inspect.Parameter(name, kind, annotation=str) for name in op.path_args]
    if op.body is not None:
        params.append(inspect.Parameter("body", kind, annotation=getattr(schemas, op.body)))
    params += [
        inspect.Parameter("state", kind, annotation=State),
        inspect.Parameter("tenant", kind, annotation=TenantCaller),
    ]
    returns = Response if op.answer is None else dict[str, Any]
    endpoint.__signature__ = inspect.Signature(params, return_annotation=returns)  # type: ignore[attr-defined]
    endpoint.__name__ = op.name
    return endpoint


for _op in OPS:
    router.add_api_route(
        _op.path,
        _endpoint(_op),
        methods=[_op.method],
        name=_op.name,
        summary=_op.summary,
        status_code=_op.status,
        tags=[_op.tag],
    )
