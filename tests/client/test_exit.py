"""Scripts that end without closing their client exit promptly (issue 14, item 1).

Each variant is a real script run by a fresh interpreter, its output read through pipes until EOF, as a user's
terminal or ``python3 agent.py | tee log`` would. Before the fix every embedded variant without ``with``
printed its last line and hung forever at interpreter shutdown (the blocking portal's generator was finalized
after the loop thread had been frozen).

The script stamps its last line with ``time.monotonic()`` (one clock for the whole machine); the test stamps
the moment the process has exited and its pipes are closed, and allows 2 s between them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from corral import Sandbox

pytestmark = [pytest.mark.root, pytest.mark.bwrap]

EXIT_WITHIN = 2.0  # seconds from the script's last line to its exit
HANG = 60.0  # a hung script is killed after this long, and the test fails

BODIES = {
    "kill": """
        s.commands.run("echo hi")
        s.kill()
    """,
    "no-kill": """
        s.commands.run("echo hi")
    """,
    "background": """
        s.commands.start("sleep 300")
        s.commands.run("echo hi")
    """,
    "background-kill": """
        s.commands.start("sleep 300")
        s.kill()
    """,
    "pause-resume": """
        s.pause()
        s.resume()
        s.commands.run("echo hi")
    """,
    "with": None,  # the control: a with block always exited
}


def _script(isolation: str, body: str | None) -> str:
    if body is None:
        return textwrap.dedent(f"""
            import time
            from corral import Sandbox
            with Sandbox.create(isolation={isolation!r}, timeout=120) as s:
                print("id", s.sandbox_id, flush=True)
                assert s.commands.run("echo hi").stdout == "hi\\n"
            print("end", time.monotonic(), flush=True)
        """)
    return (
        textwrap.dedent(f"""
            import time
            from corral import Sandbox
            s = Sandbox.create(isolation={isolation!r}, timeout=120)
            print("id", s.sandbox_id, flush=True)
        """)
        + textwrap.dedent(body)
        + 'print("end", time.monotonic(), flush=True)\n'
    )


def _run(script: str, tmp_path: Path, env: dict[str, str]) -> tuple[str, float]:
    path = tmp_path / "script.py"
    path.write_text(script)
    proc = subprocess.Popen(
        [sys.executable, str(path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        out, err = proc.communicate(timeout=HANG)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"the script did not exit within {HANG} s\nstdout: {out}\nstderr: {err}")
    exited = time.monotonic()
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    return out, exited


def _check(out: str, exited: float) -> str:
    lines = dict(line.split(" ", 1) for line in out.splitlines())
    assert set(lines) == {"id", "end"}, out
    lag = exited - float(lines["end"])
    assert lag < EXIT_WITHIN, f"exited {lag:.2f} s after its last line"
    return lines["id"]


def _cleanup(sandbox_id: str) -> None:
    """Variants that did not kill leave their sandbox to its timeout, as documented; the test kills it."""
    for info in Sandbox.list(include_stopped=True):
        if info.sandbox_id == sandbox_id and info.state.value != "stopped":
            Sandbox.connect(sandbox_id).kill()


def _embedded_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("CORRAL_URL", None)
    env.pop("CORRAL_API_KEY", None)
    return env


@pytest.mark.parametrize("variant", list(BODIES))
def test_embedded_namespace_script_exits(variant: str, tmp_path: Path) -> None:
    out, exited = _run(_script("namespace", BODIES[variant]), tmp_path, _embedded_env())
    _cleanup(_check(out, exited))


@pytest.mark.runsc
@pytest.mark.parametrize("variant", ["kill", "no-kill", "background", "pause-resume", "with"])
def test_embedded_gvisor_script_exits(variant: str, tmp_path: Path) -> None:
    out, exited = _run(_script("gvisor", BODIES[variant]), tmp_path, _embedded_env())
    _cleanup(_check(out, exited))


@pytest.mark.parametrize("variant", ["kill", "no-kill", "background", "pause-resume"])
def test_remote_script_exits(variant: str, tmp_path: Path, corral_server) -> None:  # type: ignore[no-untyped-def]
    env = {**_embedded_env(), "CORRAL_URL": corral_server.url, "CORRAL_API_KEY": corral_server.api_key}
    out, exited = _run(_script("namespace", BODIES[variant]), tmp_path, env)
    sandbox_id = _check(out, exited)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CORRAL_URL", corral_server.url)
        mp.setenv("CORRAL_API_KEY", corral_server.api_key)
        _cleanup(sandbox_id)


def test_async_script_without_aclose_exits(tmp_path: Path) -> None:
    script = textwrap.dedent("""
        import asyncio, time
        from corral import AsyncSandbox

        async def main():
            s = await AsyncSandbox.create(isolation="namespace", timeout=120)
            print("id", s.sandbox_id, flush=True)
            await s.commands.start("sleep 300")
            assert (await s.commands.run("echo hi")).stdout == "hi\\n"

        asyncio.run(main())
        print("end", time.monotonic(), flush=True)
    """)
    out, exited = _run(script, tmp_path, _embedded_env())
    _cleanup(_check(out, exited))


def test_a_client_dropped_without_close_stops_its_loop_thread(tmp_path: Path) -> None:
    """Collected while the program goes on (not only at exit): its loop thread ends, nothing piles up."""
    script = textwrap.dedent("""
        import gc, threading, time
        from corral import Sandbox
        ids = []
        for _ in range(3):
            s = Sandbox.create(isolation="namespace", timeout=120)
            ids.append(s.sandbox_id)
            s.kill()
            del s
            gc.collect()
        time.sleep(0.5)
        print("threads", ",".join(sorted(t.name for t in threading.enumerate())), flush=True)
        print("end", time.monotonic(), flush=True)
    """)
    out, _ = _run(script, tmp_path, _embedded_env())
    assert "threads MainThread\n" in out, out
