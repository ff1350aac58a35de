"""Who may reach a sandbox through the E2B surface, and as which tenant.

E2B's SDK proves access to a sandbox's envd and code interpreter with the sandbox's own secret (the
``envdAccessToken`` of its create/connect answer, sent as ``X-Access-Token``), never with an API key. So the
caller's tenant is the owner of the sandbox whose secret it holds. A wrong secret, an unknown id and a stopped
sandbox all answer the same :class:`NotFound`: nothing tells a guesser which ids exist.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from corral.core.service import SandboxService
from corral.errors import NotFound
from corral.ids import SandboxId, TenantId
from corral.models import SandboxState

__all__ = ["SandboxAccess", "SandboxCall"]


@dataclass(frozen=True, kw_only=True)
class SandboxCall:
    """One authenticated request to a sandbox: every service call it makes passes this tenant."""

    service: SandboxService
    sandbox_id: str
    tenant: TenantId
    token: str  # the sandbox's secret, which also keys its signed file URLs


class SandboxAccess:
    def __init__(self, service: SandboxService) -> None:
        self.service = service

    async def secret(self, sandbox_id: str) -> tuple[str, TenantId]:
        """The live sandbox's secret and owner, or NotFound."""
        record = None
        if SandboxId.is_valid(sandbox_id):
            record = await self.service.store.get_sandbox(SandboxId(sandbox_id))
        if record is None or record.pool_id is not None or record.state is SandboxState.STOPPED:
            raise NotFound(f"sandbox {sandbox_id} was not found")
        return record.traffic_token, record.tenant_id

    async def call(self, sandbox_id: str, token: str | None) -> SandboxCall:
        """The request's call context when ``token`` is the sandbox's secret (compared in constant time)."""
        secret, tenant = await self.secret(sandbox_id)
        if not token or not hmac.compare_digest(token.encode(), secret.encode()):
            raise NotFound(f"sandbox {sandbox_id} was not found")
        return SandboxCall(service=self.service, sandbox_id=sandbox_id, tenant=tenant, token=secret)

    async def traffic_call(self, sandbox_id: str, traffic_token: str) -> SandboxCall:
        """The call context for a holder of the sandbox's traffic token (the code interpreter's context calls)."""
        record = None
        if SandboxId.is_valid(sandbox_id):
            record = await self.service.store.get_sandbox(SandboxId(sandbox_id))
        if (
            record is None
            or record.state is SandboxState.STOPPED
            or not hmac.compare_digest(traffic_token.encode(), record.traffic_token.encode())
        ):
            raise NotFound(f"sandbox {sandbox_id} was not found")
        secret, tenant = await self.secret(sandbox_id)
        return SandboxCall(service=self.service, sandbox_id=sandbox_id, tenant=tenant, token=secret)
