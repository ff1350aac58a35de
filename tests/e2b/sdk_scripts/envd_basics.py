"""envd as an agent pinned to some e2b release drives it (run as a subprocess, like rest_lifecycle.py):
commands, stdin, kill, files, list, watch and signed URLs, sync and async. Exits non-zero on any difference."""

from __future__ import annotations

import asyncio
import importlib.metadata
import os
import sys
import time
import urllib.request

from e2b import AsyncSandbox, CommandExitException, Sandbox


def sync_envd() -> None:
    sbx = Sandbox.create(timeout=300)
    try:
        r = sbx.commands.run('echo "out-$A"; echo err >&2; pwd; id -un', envs={"A": "1"})
        assert (r.stdout, r.stderr, r.exit_code) == ("out-1\n/home/user\nuser\n", "err\n", 0), r
        assert sbx.commands.run("id -u", user="root").stdout == "0\n"
        try:
            sbx.commands.run("exit 5")
            raise AssertionError("no CommandExitException")
        except CommandExitException as exc:
            assert exc.exit_code == 5
        handle = sbx.commands.run("cat", background=True, stdin=True)
        sbx.commands.send_stdin(handle.pid, "piped")
        sleeper = sbx.commands.run("sleep 300", background=True)
        assert sbx.commands.kill(sleeper.pid) is True
        assert sbx.commands.kill(handle.pid) is True
        sbx.files.write("/tmp/s/a.txt", "alpha")
        assert sbx.files.read("/tmp/s/a.txt") == "alpha"
        assert [e.name for e in sbx.files.list("/tmp/s")] == ["a.txt"]
        assert sbx.files.exists("/tmp/s/a.txt") and not sbx.files.exists("/tmp/s/b.txt")
        assert sbx.files.make_dir("/tmp/s/d") is True
        sbx.files.rename("/tmp/s/a.txt", "/tmp/s/d/b.txt")
        assert sbx.files.get_info("/tmp/s/d/b.txt").size == 5
        watcher = sbx.files.watch_dir("/tmp/s")
        sbx.files.write("/tmp/s/w.txt", "w")
        names: list[str] = []
        deadline = time.monotonic() + 20
        while "w.txt" not in names and time.monotonic() < deadline:
            names += [e.name for e in watcher.get_new_events()]
            time.sleep(0.05)
        watcher.stop()
        assert "w.txt" in names, names
        with urllib.request.urlopen(sbx.download_url("/tmp/s/d/b.txt")) as answer:
            assert answer.read() == b"alpha"
        sbx.files.remove("/tmp/s")
        assert not sbx.files.exists("/tmp/s")
        assert sbx.is_running()
    finally:
        sbx.kill()
    assert not sbx.is_running()


async def async_envd() -> None:
    sbx = await AsyncSandbox.create(timeout=300)
    try:
        out: list[str] = []
        r = await sbx.commands.run("echo a; echo b", on_stdout=out.append)
        assert r.stdout == "a\nb\n" and "".join(out) == "a\nb\n"
        await sbx.files.write("/tmp/x.bin", b"\x00\x01")
        assert await sbx.files.read("/tmp/x.bin", format="bytes") == bytearray(b"\x00\x01")
    finally:
        await sbx.kill()


sync_envd()
asyncio.run(async_envd())
print(f"e2b {importlib.metadata.version('e2b')}: ok", file=sys.stderr, flush=True)
# Every check passed. Leave without interpreter teardown: the SDK's native HTTP transport (pyqwest) can abort
# (SIGABRT) while its threads are torn down at exit, which says nothing about the server (rest_lifecycle.py too).
os._exit(0)
