"""The real ``e2b`` SDK against a real ``corral serve`` (the session's ``corral_server``), single-URL mode.

Sandboxes are created through Corral's own SDK (remote mode) and handed to the E2B SDK with the answer E2B's
create/connect would give (sandbox id, envd version, envd access token), in single-URL mode
(``E2B_SANDBOX_URL`` = the server): exactly the values E2B's ``Sandbox.create`` passes on, so every envd call
below is the SDK's own, unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from packaging.version import Version

from corral import Sandbox
from corral.server.e2b.envd import ENVD_VERSION
from e2b import AsyncSandbox, ConnectionConfig
from e2b import Sandbox as E2BSandbox

API_KEY = "e2b_" + "0" * 40  # the SDK wants one in this shape; envd calls never send it


@dataclass(frozen=True)
class Box:
    corral: Sandbox
    url: str
    token: str

    def e2b(self, *, token: str | None = None, sandbox_id: str | None = None) -> E2BSandbox:
        return E2BSandbox(**self._opts(token, sandbox_id))  # type: ignore[misc]

    def e2b_async(self, *, token: str | None = None) -> AsyncSandbox:
        return AsyncSandbox(**self._opts(token, None))  # type: ignore[misc]

    def _opts(self, token: str | None, sandbox_id: str | None) -> dict[str, object]:
        sid = sandbox_id or self.corral.sandbox_id
        tok = token if token is not None else self.token
        headers = {"E2b-Sandbox-Id": sid, "E2b-Sandbox-Port": "49983", "X-Access-Token": tok}
        config = ConnectionConfig(
            api_key=API_KEY, api_url=self.url, sandbox_url=self.url, extra_sandbox_headers=headers
        )
        return {
            "sandbox_id": sid,
            "sandbox_domain": None,
            "envd_version": Version(ENVD_VERSION),
            "envd_access_token": tok,
            "traffic_access_token": self.corral.traffic_token,
            "connection_config": config,
        }


@pytest.fixture(scope="module")
def remote(corral_server):  # type: ignore[no-untyped-def]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CORRAL_URL", corral_server.url)
        mp.setenv("CORRAL_API_KEY", corral_server.api_key)
        yield corral_server


def make_box(server_url: str, **create: object) -> Iterator[Box]:
    with Sandbox.create(isolation="namespace", timeout=900, **create) as sbx:  # type: ignore[arg-type]
        token = sbx.get_info().envd_access_token
        assert token
        yield Box(corral=sbx, url=server_url, token=token)


@pytest.fixture(scope="module")
def box(remote) -> Iterator[Box]:  # type: ignore[no-untyped-def]
    yield from make_box(remote.url)
