"""Egress policy operations of the service: change a sandbox's policy at runtime, report what it decided,
and copy the runtime's decision feed into the audit log.

The runtime enforces (``Capabilities.network_policy``, :class:`~corral.runtimes.base.NetworkController`);
this module checks the request, keeps the record and the audit log right, and counts decisions in metrics.
The feed is copied from the offset stored in the sandbox's record, so a restarted server neither drops nor
repeats entries; it is copied on every status and update call and once more before the sandbox is
destroyed, so no decision of a sandbox is lost with its state directory.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from typing import Any

from corral.core.audit import AuditAction, AuditLog
from corral.core.records import SandboxRecord
from corral.core.store import Store
from corral.errors import Conflict, CorralError, Unsupported
from corral.netpolicy import IpNetwork, NetworkPolicy
from corral.runtimes.base import NetworkController, Runtime

__all__ = ["Tally", "check_policy", "controller", "ingest_decisions", "require_with_network"]

log = logging.getLogger("corral.core.network")

Tally = Counter[tuple[str, bool]]  # (kind, allowed) -> decisions copied into the audit log (for metrics)


def check_policy(value: object, runtime: Runtime, isolation: str, denied: list[IpNetwork]) -> NetworkPolicy:
    """The request's policy, refused (typed) when malformed, inside a denied range, or not enforceable."""
    policy = NetworkPolicy.parse(value)
    policy.check_ranges(denied)
    if policy.enabled and not runtime.capabilities.network_policy:
        raise Unsupported(
            f"{isolation} sandboxes cannot have network; use network='none' or an isolation that enforces "
            "egress policies (namespace, gvisor, microvm)",
            details={"isolation": isolation},
        )
    names = [r.text for r in policy.rules if r.name is not None]
    if policy.enabled and names and not runtime.capabilities.network_names:
        raise Unsupported(
            f"{isolation} sandboxes enforce egress by address only: host name rules ({', '.join(names[:5])})"
            ' cannot be enforced; use CIDR rules (like "203.0.113.0/24:443"), "internet", or an isolation'
            " that checks names (namespace, gvisor, microvm)",
            details={"isolation": isolation, "rules": names[:20]},
        )
    return policy


def require_with_network(record: SandboxRecord, capable: bool, what: str) -> None:
    """Unsupported when ``record`` has network and its runtime is not ``capable`` of being ``what``
    ("paused": ``Capabilities.pause_network``; "snapshotted or forked": ``snapshot_network``) with it."""
    if not capable and NetworkPolicy.parse(record.network).enabled:
        raise Unsupported(
            f"{record.isolation} sandboxes with network cannot be {what}; use network='none' for that",
            details={"isolation": record.isolation},
        )


def controller(runtime: Runtime, isolation: str) -> NetworkController:
    if not runtime.capabilities.network_policy or not isinstance(runtime, NetworkController):
        raise Unsupported(f"{isolation} sandboxes have no network policy to change")
    return runtime


async def ingest_decisions(
    store: Store,
    audit: AuditLog,
    runtime: Runtime,
    record: SandboxRecord,
    tally: Tally,
) -> SandboxRecord:
    """Append the sandbox's new egress decisions to the audit log; returns the record with its new offset."""
    if record.instance is None or not isinstance(runtime, NetworkController):
        return record
    try:
        lines, offset = await runtime.network_decisions(record.instance, record.network_audit_offset)
    except CorralError:
        log.exception("sandbox %s: could not read its egress decisions", record.sandbox_id)
        return record
    if not lines:
        return record
    for line in lines:
        allowed = bool(line.get("allowed"))
        details: dict[str, Any] = {
            k: line.get(k)
            for k in ("kind", "dest", "port", "rule", "name", "count")
            if line.get(k) is not None
        }
        await audit.record(
            AuditAction.NETWORK_ALLOW if allowed else AuditAction.NETWORK_DENY,
            tenant_id=record.tenant_id,
            sandbox_id=record.sandbox_id,
            **details,
        )
        tally[(str(line.get("kind")), allowed)] += int(line.get("count", 1))
    try:
        return await store.put_sandbox(
            dataclasses.replace(record, network_audit_offset=offset), expect_version=record.version
        )
    except Conflict:  # someone else moved the record on; the next call copies from the stored offset
        fresh = await store.get_sandbox(record.sandbox_id)
        if fresh is None:
            return record
        return await store.put_sandbox(
            dataclasses.replace(fresh, network_audit_offset=max(offset, fresh.network_audit_offset)),
            expect_version=fresh.version,
        )
