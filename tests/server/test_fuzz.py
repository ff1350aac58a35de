"""Fuzz the REST API from its own OpenAPI document (schemathesis): whatever arrives, no 5xx.

The app runs in-process over the fake runtime (real processes, no isolation: this tests the HTTP layer, the
service and the agent path, not a runtime) with a tenant key, so requests get past authentication and reach
the handlers; positive and negative cases both come from the schema.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, settings

from _corral_server import free_port
from corral.core.auth import AuthService
from corral.core.service import SandboxService
from corral.core.settings import Settings
from corral.runtimes.base import RuntimeConfig
from corral.runtimes.fake import FakeRuntime
from corral.server.app import create_app
from corral.store.memory import MemoryStore

_DATA = Path(tempfile.mkdtemp(prefix="corral-fuzz-"))
_CONF = Settings.load(env={}, data_dir=_DATA, enabled_runtimes=("fake",), default_isolation="fake")
_RUNTIME = FakeRuntime(RuntimeConfig(state_root=_CONF.state_root, cache_root=_CONF.cache_root))
_SERVICE = SandboxService(settings=_CONF, store=MemoryStore(), runtime_for=lambda _: _RUNTIME)
_APP = create_app(_CONF, service=_SERVICE, run_background=False)
schema = schemathesis.openapi.from_dict(_APP.openapi())
# E2B's routes (server/e2b) answer errors in E2B's shape, {"code": <status>, "message"}, for E2B's SDK
_E2B_OPERATIONS = {
    (method.upper(), path)
    for path, ops in _APP.openapi()["paths"].items()
    for method, op in ops.items()
    if "e2b" in op.get("tags", [])
}


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, str]]:
    """The app above, served by uvicorn on one event loop in a thread; yields (base URL, tenant key)."""

    async def prepare() -> str:  # MemoryStore is plain data: safe to fill from this short-lived loop
        auth = AuthService(_SERVICE.store)
        await auth.create_tenant("fuzz")
        return (await auth.create_key(tenant="fuzz")).token

    key = anyio.run(prepare)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(_APP, host="127.0.0.1", port=port, log_config=None, lifespan="on"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)  # uvicorn offers no start event across threads
    try:
        yield f"http://127.0.0.1:{port}", key
    finally:

        async def cleanup() -> None:
            for record in await _SERVICE.store.list_sandboxes():
                await _SERVICE.kill(record.sandbox_id, tenant=record.tenant_id)

        # kill sandboxes on the server's own loop (their agent connections live there), then stop it
        fut = asyncio.run_coroutine_threadsafe(cleanup(), _loop_of(srv))
        fut.result(timeout=120)
        srv.should_exit = True
        thread.join(timeout=30)
        shutil.rmtree(_DATA, ignore_errors=True)


def _loop_of(srv: uvicorn.Server) -> asyncio.AbstractEventLoop:
    return srv.servers[0].get_loop() if srv.servers else asyncio.get_event_loop()  # type: ignore[no-any-return]


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_request_makes_the_server_fail(case: schemathesis.Case, server: tuple[str, str]) -> None:
    base_url, key = server
    response = case.call(base_url=base_url, headers={"Authorization": f"Bearer {key}"})
    assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:500])
    content_type = response.headers.get("content-type") or [""]  # schemathesis gives header value lists
    if response.status_code >= 400 and content_type[0].startswith("application/json"):
        body = response.json()
        if (case.method.upper(), case.operation.path) in _E2B_OPERATIONS:
            assert set(body) == {"code", "message"} and body["code"] == response.status_code, body
        else:
            assert set(body["error"]) == {"code", "message", "details"}, body
