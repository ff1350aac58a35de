"""Admin: tenants and their quotas, API keys, and the audit log (export and verification)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse

from corral.core.audit import AuditAction, iter_entries, verify
from corral.core.auth import Quotas
from corral.server.app import Caller, State
from corral.server.routes._stream import NDJSON
from corral.server.schemas import KeyBody, QuotasBody, TenantBody

router = APIRouter(prefix="/v1", tags=["admin"])


@router.post("/tenants", status_code=201, summary="Create a tenant")
async def create_tenant(body: TenantBody, state: State, caller: Caller) -> dict[str, Any]:
    record = await state.auth.create_tenant(body.name, quotas=Quotas(**body.quotas.model_dump()))
    await state.service.audit.record(
        AuditAction.TENANT_CREATE, tenant_id=record.tenant_id, name=record.name, by=caller.key_id
    )
    return record.to_wire()


@router.get("/tenants", summary="All tenants")
async def list_tenants(state: State, _: Caller) -> dict[str, Any]:
    return {"tenants": [t.to_wire() for t in await state.auth.store.list_tenants()]}


@router.put("/tenants/{tenant}/quotas", summary="Replace a tenant's quotas (unset = unlimited)")
async def set_quotas(tenant: str, body: QuotasBody, state: State, _: Caller) -> dict[str, Any]:
    return (await state.auth.set_quotas(tenant, Quotas(**body.model_dump()))).to_wire()


@router.post(
    "/tenants/{tenant}/keys", status_code=201, summary="Make an API key for a tenant; the key is shown once"
)
async def create_key(tenant: str, body: KeyBody, state: State, caller: Caller) -> dict[str, Any]:
    new = await state.auth.create_key(tenant=tenant, name=body.name, e2b=body.e2b)
    await state.service.audit.record(
        AuditAction.KEY_CREATE, tenant_id=new.record.tenant_id, key_id=new.record.key_id, by=caller.key_id
    )
    return {**new.record.to_wire(), "key": new.token}


@router.get("/keys", summary="API keys (never their secrets)")
async def list_keys(state: State, _: Caller) -> dict[str, Any]:
    return {"keys": [k.to_wire() for k in await state.auth.store.list_keys()]}


@router.delete("/keys/{key_id}", summary="Revoke an API key")
async def revoke_key(key_id: str, state: State, caller: Caller) -> dict[str, Any]:
    record = await state.auth.revoke_key(key_id)
    await state.service.audit.record(
        AuditAction.KEY_REVOKE, tenant_id=record.tenant_id, key_id=record.key_id, by=caller.key_id
    )
    return record.to_wire()


@router.get(
    "/audit", summary="Export the audit log as JSON lines", responses={200: {"content": {NDJSON: {}}}}
)
async def export_audit(state: State, _: Caller, after: Annotated[int, Query(ge=0)] = 0) -> StreamingResponse:
    async def lines() -> AsyncIterator[bytes]:
        async for entry in iter_entries(state.service.store, after_seq=after):
            yield json.dumps(entry.to_wire(), ensure_ascii=False, sort_keys=True).encode() + b"\n"

    return StreamingResponse(lines(), media_type=NDJSON)


@router.get("/audit/verify", summary="Check the audit log's hash chain")
async def verify_audit(state: State, _: Caller) -> dict[str, Any]:
    result = await verify(state.service.store)
    return {
        "ok": result.ok,
        "entries": result.entries,
        "head_hash": result.head_hash,
        "first_bad_seq": result.first_bad_seq,
        "problem": result.problem,
    }
