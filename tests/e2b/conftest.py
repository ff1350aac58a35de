"""A real ``corral serve`` for the E2B SDK tests, and E2B-style keys of two tenants on it.

The SDK is pointed at it the way a user moving from E2B would: environment variables only (``E2B_API_URL``,
``E2B_SANDBOX_URL``, ``E2B_API_KEY``). ``E2B_DOMAIN`` is set to ``localhost`` as well, so that any URL the SDK
forms from a domain stays on this machine.

The envd tests (commands, files, the code interpreter) share one sandbox per module, made by E2B's own
``Sandbox.create`` (:class:`Box`); ``Box.e2b(token=…)`` is the same sandbox as the SDK would see it with
another access token (what ``Sandbox.create`` builds from the create answer, with that token swapped in).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from _e2b_server import E2BServer
from packaging.version import Version

from _corral_server import Server, new_key
from corral.server.e2b import ENVD_VERSION
from e2b import AsyncSandbox, ConnectionConfig
from e2b import Sandbox as E2BSandbox


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if item.path.is_relative_to(here):  # the server's sandboxes run in gVisor, its default isolation
            item.add_marker(pytest.mark.root)
            item.add_marker(pytest.mark.runsc)


@pytest.fixture(scope="session")
def e2b_server(corral_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[E2BServer]:
    data_dir = corral_data_dir / "e2b-server"  # under the session's data dir: the leak check covers it
    env = {**os.environ, "CORRAL_DATA_DIR": str(data_dir)}
    key_a = new_key(env, "--tenant", "e2b-a", "--e2b")
    key_b = new_key(env, "--tenant", "e2b-b", "--e2b")
    corral_key_a = new_key(env, "--tenant", "e2b-a")
    server = Server(env, tmp_path_factory.mktemp("e2b-server") / "server.log")
    server.start()
    try:
        yield E2BServer(
            url=server.url, key_a=key_a, key_b=key_b, corral_key_a=corral_key_a, data_dir=data_dir
        )
    finally:
        server.stop()


@pytest.fixture
def e2b_env(e2b_server: E2BServer, monkeypatch: pytest.MonkeyPatch) -> E2BServer:
    """The SDK's environment for tenant e2b-a: what a user exports, and nothing else."""
    _set_env(monkeypatch, e2b_server, e2b_server.key_a)
    return e2b_server


def _set_env(mp: pytest.MonkeyPatch, server: E2BServer, key: str) -> None:
    mp.setenv("E2B_API_URL", server.url)
    mp.setenv("E2B_SANDBOX_URL", server.url)
    mp.setenv("E2B_API_KEY", key)
    mp.setenv("E2B_DOMAIN", "localhost")
    for name in ("E2B_DEBUG", "E2B_ACCESS_TOKEN"):
        mp.delenv(name, raising=False)


@dataclass(frozen=True)
class Box:
    """One sandbox made by ``e2b.Sandbox.create``, and ways to reach it as the SDK does."""

    sandbox: E2BSandbox
    url: str

    @property
    def sandbox_id(self) -> str:
        return self.sandbox.sandbox_id

    @property
    def token(self) -> str:
        token = self.sandbox._envd_access_token
        assert token
        return token

    def e2b(self, *, token: str | None = None, sandbox_id: str | None = None) -> E2BSandbox:
        if token is None and sandbox_id is None:
            return self.sandbox
        return E2BSandbox(**self._opts(token, sandbox_id))  # type: ignore[misc]

    def e2b_async(self) -> AsyncSandbox:
        return AsyncSandbox(**self._opts(None, None))  # type: ignore[misc]

    def _opts(self, token: str | None, sandbox_id: str | None) -> dict[str, object]:
        sid = sandbox_id or self.sandbox_id
        tok = token if token is not None else self.token
        headers = {"E2b-Sandbox-Id": sid, "E2b-Sandbox-Port": "49983", "X-Access-Token": tok}
        config = ConnectionConfig(api_url=self.url, sandbox_url=self.url, extra_sandbox_headers=headers)
        return {
            "sandbox_id": sid,
            "sandbox_domain": None,
            "envd_version": Version(ENVD_VERSION),
            "envd_access_token": tok,
            "traffic_access_token": self.sandbox.traffic_access_token,
            "connection_config": config,
        }


@pytest.fixture(scope="module")
def module_env(e2b_server: E2BServer) -> Iterator[E2BServer]:
    """:func:`e2b_env` for module-scoped sandboxes."""
    with pytest.MonkeyPatch.context() as mp:
        _set_env(mp, e2b_server, e2b_server.key_a)
        yield e2b_server


def make_box(server: E2BServer, **create: object) -> Iterator[Box]:
    sandbox = E2BSandbox.create(timeout=900, **create)  # type: ignore[arg-type]
    try:
        yield Box(sandbox=sandbox, url=server.url)
    finally:
        sandbox.kill()


@pytest.fixture(scope="module")
def box(module_env: E2BServer) -> Iterator[Box]:
    yield from make_box(module_env)
