"""Who reaches a sandbox through the E2B surface: only holders of its envd access token (or a URL signed with
it). A wrong token, another sandbox's token and a stopped sandbox all look the same: "was not found", which
the SDK raises as ``SandboxNotRunningException``. Killing a sandbox cuts the streams open on it."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from _e2b_server import E2BServer

from conftest import Box, make_box
from e2b import SandboxException, SandboxNotRunningException


@pytest.fixture(scope="module")
def other(module_env: E2BServer) -> Iterator[Box]:
    """A sandbox of the other tenant (e2b-b)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("E2B_API_KEY", module_env.key_b)
        yield from make_box(module_env)


def test_a_wrong_token_is_not_found(box: Box) -> None:
    sbx = box.e2b(token="not-the-token")
    with pytest.raises(SandboxNotRunningException, match="was not found"):
        sbx.commands.run("true")
    with pytest.raises(SandboxNotRunningException, match="was not found"):
        sbx.files.read("/etc/hostname")
    assert sbx.is_running() is False


def test_another_sandboxs_token_does_not_open_this_one(box: Box, other: Box) -> None:
    crossed = other.e2b(token=box.token)  # the other sandbox's id with this one's token
    with pytest.raises(SandboxNotRunningException, match="was not found"):
        crossed.commands.run("true")
    with pytest.raises(SandboxNotRunningException):
        crossed.files.write("/tmp/x", "no")


def test_the_answer_for_a_wrong_token_is_the_answer_for_no_sandbox(box: Box) -> None:
    def answer(sandbox_id: str, token: str) -> tuple[int, object]:
        r = httpx.post(
            f"{box.url}/filesystem.Filesystem/Stat",
            json={"path": "/"},
            headers={"E2b-Sandbox-Id": sandbox_id, "E2b-Sandbox-Port": "49983", "X-Access-Token": token},
        )
        body = r.json()
        body.pop("sandboxId")
        return r.status_code, {
            k: v.replace(sandbox_id, "ID") if isinstance(v, str) else v for k, v in body.items()
        }

    wrong = answer(box.sandbox_id, "x" * 43)
    missing = answer("sb-aaaaaaaaaaaaaaaa", box.token)
    malformed = answer("nope", box.token)
    assert wrong == missing == malformed == (502, {"message": "The sandbox ID was not found", "code": 502})


@pytest.fixture
def doomed(module_env: E2BServer) -> Iterator[Box]:
    yield from make_box(module_env)


def test_killing_the_sandbox_cuts_its_open_streams(doomed: Box) -> None:
    box = doomed
    sbx = box.e2b()
    handle = sbx.commands.run("echo up; sleep 600", background=True)
    ended: list[BaseException] = []
    done = threading.Event()

    def follow() -> None:
        try:
            handle.wait()
        except BaseException as exc:
            ended.append(exc)
        done.set()

    threading.Thread(target=follow, daemon=True).start()
    time.sleep(0.3)  # let the stream be read from (the kill below ends it either way)
    box.sandbox.kill()
    assert done.wait(30), "the stream stayed open after the sandbox was killed"
    assert isinstance(ended[0], SandboxException)
    assert isinstance(ended[0], SandboxNotRunningException), ended[0]
