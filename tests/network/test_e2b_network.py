"""E2B's egress options (``allow_internet_access``, ``network``, ``update_network``) through the real ``e2b``
SDK against ``corral serve``, whose egress uplink is the test's own upstream namespace (no route out).

Two servers: one with Corral's default (an E2B create that makes no choice gets no network), on the namespace
runtime; one with ``[e2b] internet_by_default = true`` (E2B's rule), on gVisor.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.root, pytest.mark.bwrap, pytest.mark.runsc]
CLIENT = Path(__file__).with_name("_client.py").read_text()
ALL = "0.0.0.0/0"


def probe(sbx: object, *args: str) -> dict:
    argv = " ".join(["python3", "-c", _quote(CLIENT), *args])
    result = sbx.commands.run(argv, timeout=60)  # type: ignore[attr-defined]
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


def reaches(sbx: object, name: str) -> bool:
    return bool(probe(sbx, "url", name)["ok"])


def _server(
    tmp: pytest.TempPathFactory, egress_env: dict[str, str], corral_data_dir: Path, name: str, **extra: str
) -> Iterator[dict[str, str]]:
    sys.path.insert(0, str(Path(__file__).parents[1]))
    from _corral_server import Server, new_key

    env = {**os.environ, **egress_env, **extra, "CORRAL_DATA_DIR": str(corral_data_dir / name)}
    key = new_key(env, "--tenant", name, "--e2b")
    server = Server(env, tmp.mktemp(name) / "server.log")
    server.start()
    try:
        yield {"E2B_API_URL": server.url, "E2B_SANDBOX_URL": server.url, "E2B_API_KEY": key}
    finally:
        server.stop()


@pytest.fixture(scope="module")
def egress_env(internet) -> dict[str, str]:  # type: ignore[no-untyped-def]
    # THE rule: the servers' sandbox traffic leaves only into the test's own namespace, which has no route out
    assert Path(internet.path).exists()
    return {"CORRAL_EGRESS_UPLINK_NETNS": internet.path, "CORRAL_EGRESS_RESOLVERS": "198.18.0.53"}


@pytest.fixture(scope="module")
def secure_server(tmp_path_factory, egress_env, corral_data_dir) -> Iterator[dict[str, str]]:  # type: ignore[no-untyped-def]
    yield from _server(
        tmp_path_factory, egress_env, corral_data_dir, "e2b-net-secure", CORRAL_ISOLATION="namespace"
    )


@pytest.fixture(scope="module")
def open_server(tmp_path_factory, egress_env, corral_data_dir) -> Iterator[dict[str, str]]:  # type: ignore[no-untyped-def]
    yield from _server(
        tmp_path_factory,
        egress_env,
        corral_data_dir,
        "e2b-net-open",
        CORRAL_ISOLATION="gvisor",
        CORRAL_E2B_INTERNET_BY_DEFAULT="true",
    )


def _use(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("E2B_DOMAIN", "localhost")
    monkeypatch.delenv("E2B_DEBUG", raising=False)


def test_secure_default_allow_lists_and_updates(secure_server, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from e2b.exceptions import SandboxException

    from e2b import Sandbox

    _use(monkeypatch, secure_server)
    # no choice (2.63 sends nothing; 2.45 sends allow_internet_access=true on every create): no network at all
    for create in ({}, {"allow_internet_access": True}):
        sbx = Sandbox.create(timeout=120, **create)
        try:
            info = sbx.get_info()
            assert info.allow_internet_access is False
            assert info.network is not None and info.network["deny_out"] == [ALL]
            assert not probe(sbx, "resolve", "allowed.test")["ok"]
            assert not probe(sbx, "banner", "198.18.1.1", "7000", "2")["ok"]
            with pytest.raises(SandboxException, match="no network to change"):
                sbx.update_network({"allow_out": ["allowed.test"], "deny_out": [ALL]})
        finally:
            sbx.kill()

    # E2B's allow-list: allowOut plus the all-traffic denyOut
    sbx = Sandbox.create(timeout=120, network={"allow_out": ["allowed.test"], "deny_out": [ALL]})
    try:
        info = sbx.get_info()
        assert info.allow_internet_access is False
        assert info.network is not None
        assert info.network["allow_out"] == ["allowed.test"] and info.network["deny_out"] == [ALL]
        assert reaches(sbx, "allowed.test") and not reaches(sbx, "other.test")
        assert not probe(sbx, "banner", "169.254.169.254", "80", "2")["ok"]  # never, whatever the rules

        sbx.update_network({"allow_out": ["other.test"], "deny_out": [ALL]})  # replaces every rule
        assert reaches(sbx, "other.test") and not reaches(sbx, "allowed.test")

        sbx.update_network({"deny_out": ["198.18.1.2"]})  # everything but other.test's address
        assert reaches(sbx, "allowed.test") and not reaches(sbx, "other.test")
        info = sbx.get_info()
        assert info.allow_internet_access is True and info.network is not None
        assert info.network["deny_out"] == ["198.18.1.2"] and "allow_out" not in info.network

        sbx.update_network({"allow_internet_access": False})
        assert not reaches(sbx, "allowed.test")
        assert sbx.get_info().allow_internet_access is False

        sbx.update_network({"allow_internet_access": True})  # an explicit choice on update
        assert reaches(sbx, "allowed.test") and reaches(sbx, "other.test")
        assert not probe(sbx, "banner", "10.0.0.1", "80", "2")["ok"]  # private: never

        with pytest.raises(SandboxException, match="egressProxy"):
            sbx.update_network({"allow_out": ["x.test"], "egress_proxy": {"address": "proxy.test:1080"}})
        assert reaches(sbx, "allowed.test")  # a refused update changed nothing
    finally:
        sbx.kill()


@pytest.mark.anyio
async def test_internet_by_default_is_e2bs_rule(open_server, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from e2b import AsyncSandbox, Sandbox

    _use(monkeypatch, open_server)
    sbx = Sandbox.create(timeout=120)
    try:
        info = sbx.get_info()
        assert info.allow_internet_access is True
        assert reaches(sbx, "allowed.test") and reaches(sbx, "other.test")
        assert not probe(sbx, "banner", "169.254.169.254", "80", "2")["ok"]  # metadata: never
    finally:
        sbx.kill()

    closed = await AsyncSandbox.create(timeout=120, allow_internet_access=False)
    try:
        assert (await closed.get_info()).allow_internet_access is False
        result = await closed.commands.run(
            " ".join(["python3", "-c", _quote(CLIENT), "url", "allowed.test"]), timeout=60
        )
        assert json.loads(result.stdout.strip().splitlines()[-1])["ok"] is False
    finally:
        await closed.kill()
