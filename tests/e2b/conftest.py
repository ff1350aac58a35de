"""A real ``corral serve`` for the E2B SDK tests, and E2B-style keys of two tenants on it.

The SDK is pointed at it the way a user moving from E2B would: environment variables only (``E2B_API_URL``,
``E2B_SANDBOX_URL``, ``E2B_API_KEY``). ``E2B_DOMAIN`` is set to ``localhost`` as well, so that any URL the SDK
forms from a domain stays on this machine.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from _e2b_server import E2BServer

from _corral_server import Server, new_key


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
    monkeypatch.setenv("E2B_API_URL", e2b_server.url)
    monkeypatch.setenv("E2B_SANDBOX_URL", e2b_server.url)
    monkeypatch.setenv("E2B_API_KEY", e2b_server.key_a)
    monkeypatch.setenv("E2B_DOMAIN", "localhost")
    for name in ("E2B_DEBUG", "E2B_ACCESS_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    return e2b_server
