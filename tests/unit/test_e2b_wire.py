"""E2B's REST shapes made from Corral's SandboxInfo (server/e2b/_wire.py)."""

from __future__ import annotations

from datetime import datetime

import pytest

from corral.core.settings import Settings
from corral.errors import AgentUnavailable, InvalidState, NotFound, RuntimeFailure, Timeout, Unsupported
from corral.models import SandboxInfo, SandboxState
from corral.server.e2b._wire import (
    after_token,
    corral_template,
    detail,
    e2b_error,
    page_token,
    sandbox,
    visible,
)


def info(**kw: object) -> SandboxInfo:
    base: dict[str, object] = {
        "sandbox_id": "sb-aaaaaaaaaaaaaaaa",
        "template": "base",
        "isolation": "gvisor",
        "state": SandboxState.RUNNING,
        "created_at": 1_800_000_000.25,
        "expires_at": 1_800_000_300.25,
        "memory_mb": 512,
        "cpus": 0.5,
        "traffic_token": "traffic",
        "envd_access_token": "envd",
    }
    return SandboxInfo(**{**base, **kw})  # type: ignore[arg-type]


def test_domain_only_when_the_server_has_one(tmp_path: object) -> None:
    assert sandbox(info(), Settings())["domain"] is None  # the SDK keeps E2B_SANDBOX_URL / E2B_DOMAIN
    configured = Settings(sandbox_domain="sbx.example.com")
    assert sandbox(info(), configured)["domain"] == "sbx.example.com"
    assert detail(info(), configured, 0.0)["domain"] == "sbx.example.com"


def test_tokens() -> None:
    made = sandbox(info(public_ports=True), Settings())
    assert made["envdAccessToken"] == "envd" and made["trafficAccessToken"] is None
    private = sandbox(info(public_ports=False), Settings())
    assert private["trafficAccessToken"] == "traffic"  # E2B's private ports: the SDK sends it with traffic


def test_detail_fields() -> None:
    out = detail(info(), Settings(), 0.0)
    assert out["startedAt"] == "2027-01-15T08:00:00.250000Z"
    assert datetime.fromisoformat(out["endAt"]).timestamp() == 1_800_000_300.25
    assert out["cpuCount"] == 1 and out["memoryMB"] == 512 and out["state"] == "running"
    paused = detail(info(state=SandboxState.PAUSED, expires_at=None), Settings(), 1_800_000_100.0)
    assert (
        paused["state"] == "paused" and datetime.fromisoformat(paused["endAt"]).timestamp() == 1_800_000_100.0
    )
    with pytest.raises(NotFound):
        visible(info(state=SandboxState.STOPPED))


def test_errors_keep_the_sdk_from_retrying_failures() -> None:
    # The SDK retries 502-504 by itself: a failure inside a runtime is a 500, so a create is never repeated
    for exc, status in [
        (NotFound("x"), 404),
        (InvalidState("x"), 409),
        (Unsupported("x"), 501),
        (RuntimeFailure("x"), 500),
        (AgentUnavailable("x"), 500),
        (Timeout("x"), 500),
    ]:
        response = e2b_error(exc)
        assert response.status_code == status
        assert response.body == f'{{"code":{status},"message":"x"}}'.encode()


def test_names_and_tokens() -> None:
    assert corral_template("code-interpreter-v1") == "code-interpreter"
    assert corral_template("base") == "base" and corral_template("snapshot-1") == "snapshot-1"
    key = (1_800_000_000.123456789, "sb-aaaaaaaaaaaaaaaa")
    assert after_token(page_token(key)) == key
