"""Prometheus metrics, on a registry owned by the app (no process-global state, so tests can run many apps).

Sandbox counts by state and isolation are read from the store at scrape time (the store is the truth, and a
restarted server reports correctly at once); the rest are counted as requests happen.
"""

from __future__ import annotations

from collections import Counter as _Tally

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from corral.core.service import SandboxService
from corral.models import SandboxState

__all__ = ["Metrics"]

# Create latency spans a warm-pool claim (milliseconds) to a cold gVisor boot (about half a second) and slow
# image pulls; request latency spans a stat call to a long stream.
_CREATE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.sandboxes = Gauge(
            "corral_sandboxes",
            "Sandboxes by state and isolation",
            ["state", "isolation"],
            registry=self.registry,
        )
        self.create_seconds = Histogram(
            "corral_sandbox_create_seconds",
            "Time from create request to a running sandbox",
            ["isolation"],
            buckets=_CREATE_BUCKETS,
            registry=self.registry,
        )
        self.execs = Counter(
            "corral_process_starts", "Processes started in sandboxes", registry=self.registry
        )
        self.errors = Counter(
            "corral_errors", "Error responses by error code", ["code"], registry=self.registry
        )
        self.requests = Counter(
            "corral_http_requests",
            "HTTP requests by route and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "corral_http_request_seconds",
            "HTTP request latency (to the first byte of the response)",
            ["method", "route"],
            registry=self.registry,
        )
        self.proxied = Counter(
            "corral_proxy_requests",
            "Requests relayed to sandbox ports by the port proxy, by kind (http, websocket) and status",
            ["kind", "status"],
            registry=self.registry,
        )
        self.egress = Gauge(
            "corral_egress_decisions",
            "Sandbox egress decisions (DNS answers, TCP connections) audited by this server since it started",
            ["kind", "verdict"],
            registry=self.registry,
        )
        self._pool_gauges()

    def _pool_gauges(self) -> None:
        labels = ["template", "isolation"]
        self.pool_target = Gauge(
            "corral_pool_target", "Members a warm pool keeps", labels, registry=self.registry
        )
        self.pool_ready = Gauge(
            "corral_pool_ready", "Warm-pool members ready to claim", labels, registry=self.registry
        )
        self.pool_starting = Gauge(
            "corral_pool_starting", "Warm-pool members booting", labels, registry=self.registry
        )

    async def render(self, service: SandboxService) -> bytes:
        for (kind, allowed), count in service.egress_decisions.items():
            self.egress.labels(kind, "allowed" if allowed else "denied").set(count)
        for gauge in (self.pool_target, self.pool_ready, self.pool_starting):
            gauge.clear()
        for pool in await service.pools.list_pools():
            self.pool_target.labels(pool.template, pool.isolation).set(pool.target)
            self.pool_ready.labels(pool.template, pool.isolation).set(pool.ready)
            self.pool_starting.labels(pool.template, pool.isolation).set(pool.starting)
        live = (SandboxState.CREATING, SandboxState.RUNNING, SandboxState.PAUSED)
        records = await service.store.list_sandboxes(states=frozenset(live))
        tally = _Tally((r.state.value, r.isolation) for r in records)
        self.sandboxes.clear()
        for state in live:
            for isolation in service.settings.enabled_runtimes:
                self.sandboxes.labels(state.value, isolation).set(tally.get((state.value, isolation), 0))
        return generate_latest(self.registry)
