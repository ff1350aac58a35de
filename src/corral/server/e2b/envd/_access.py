"""Who may reach a sandbox through the E2B surface, and as which tenant.

E2B's SDK proves access to a sandbox's envd and code interpreter with the sandbox's own secret (the
``envdAccessToken`` of its create/connect answer, sent as ``X-Access-Token``), never with an API key; the
service turns it into the owning tenant (:meth:`SandboxService.authenticate_envd`). Signed ``/files`` URLs
prove the same token by a hash (:meth:`SandboxService.authenticate_envd_proof`). The code interpreter's
context calls carry no envd token, only the sandbox's traffic token (``E2B-Traffic-Access-Token``). A wrong
credential, an unknown id and a stopped sandbox all answer the same :class:`NotFound`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass

import anyio

from corral.core.service import SandboxService
from corral.errors import AgentUnavailable, CorralError, NotFound, Unauthenticated
from corral.ids import SandboxId, TenantId
from corral.models import SandboxState

__all__ = ["SandboxAccess", "SandboxCall", "explained", "signature", "signature_check"]


@dataclass(frozen=True, kw_only=True)
class SandboxCall:
    """One authenticated request to a sandbox: every service call it makes passes this tenant."""

    service: SandboxService
    sandbox_id: str
    tenant: TenantId


def signature(path: str, operation: str, user: str | None, token: str, expiration: int | None) -> str:
    """envd's v1 signature: ``v1_`` + unpadded base64 of sha256(``path:op:user:token[:expiration]``)."""
    raw = f"{path}:{operation}:{user or ''}:{token}" + (f":{expiration}" if expiration is not None else "")
    return "v1_" + base64.b64encode(hashlib.sha256(raw.encode()).digest()).rstrip(b"=").decode()


GONE_WAIT = 5.0  # seconds a broken connection waits for a kill or timeout in progress to finish


async def explained(call: SandboxCall, exc: CorralError) -> CorralError:
    """``exc`` as the SDK should see it: a request cut because its sandbox is going away (killed, timed out)
    answers in the proxy's words for a stopped sandbox, "… was not found", so the SDK raises
    ``SandboxNotRunningException`` instead of a vague connection error."""
    if not isinstance(exc, AgentUnavailable):
        return exc
    with anyio.move_on_after(GONE_WAIT):
        while True:
            try:
                info = await call.service.get(call.sandbox_id, tenant=call.tenant)
            except NotFound:
                break
            if info.state is not SandboxState.RUNNING:
                break
            await anyio.sleep(0.1)  # a kill is tearing it down right now: its record says so when done
        return AgentUnavailable(f"The sandbox {call.sandbox_id} was not found: it was killed or timed out")
    return exc


def signature_check(query: dict[str, str], method: str) -> Callable[[str], bool]:
    """Whether a token made the signature of this ``/files`` request (in constant time); never for a
    malformed one."""
    raw_exp = query.get("signature_expiration")
    given = query.get("signature", "")
    if (raw_exp is not None and not raw_exp.isdigit()) or not given.startswith("v1_") or len(given) > 64:
        return lambda token: False
    expiration = int(raw_exp) if raw_exp is not None else None
    operation = "read" if method in ("GET", "HEAD") else "write"

    def proves(token: str) -> bool:
        made = signature(query.get("path", ""), operation, query.get("username") or None, token, expiration)
        return hmac.compare_digest(given.encode(), made.encode())

    return proves


class SandboxAccess:
    def __init__(self, service: SandboxService) -> None:
        self.service = service

    async def call(self, sandbox_id: str, token: str | None) -> SandboxCall:
        tenant = await self.service.authenticate_envd(sandbox_id, token)
        return SandboxCall(service=self.service, sandbox_id=sandbox_id, tenant=tenant)

    async def signed_call(self, sandbox_id: str, query: dict[str, str], method: str) -> SandboxCall:
        """A ``/files`` request signed with the sandbox's token (``download_url``/``upload_url``).

        A signature that was not made with the token is NotFound; one that was, but has expired, is
        Unauthenticated: only its holder learns that the sandbox exists.
        """
        tenant = await self.service.authenticate_envd_proof(sandbox_id, signature_check(query, method))
        expiration = query.get("signature_expiration")
        if expiration is not None and int(expiration) < time.time():
            raise Unauthenticated("this signed URL has expired; ask the sandbox for a new one")
        return SandboxCall(service=self.service, sandbox_id=sandbox_id, tenant=tenant)

    async def port_call(self, sandbox_id: str, traffic_token: str | None) -> SandboxCall:
        """The call context for port traffic (the code interpreter's context calls, which the SDK sends without
        the envd token): the sandbox's traffic token, or none at all when its ports are public (as on E2B,
        where such a sandbox's ports are open to anyone with the URL)."""
        record = None
        if SandboxId.is_valid(sandbox_id):
            record = await self.service.store.get_sandbox(SandboxId(sandbox_id))
        if record is None or record.pool_id is not None or record.state is SandboxState.STOPPED:
            raise NotFound(f"sandbox {sandbox_id} was not found")
        presented = (traffic_token or "").encode()
        if not (record.public_ports or hmac.compare_digest(presented, record.traffic_token.encode())):
            raise NotFound(f"sandbox {sandbox_id} was not found")
        return SandboxCall(service=self.service, sandbox_id=sandbox_id, tenant=record.tenant_id)
