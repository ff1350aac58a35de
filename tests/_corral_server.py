"""A real ``corral serve`` subprocess for tests: the session-wide one (conftest) and private ones that a test
kills and restarts (tests/server/test_restart.py)."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

CORRAL = [sys.executable, "-m", "corral.cli.main"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def new_key(env: dict[str, str], *args: str) -> str:
    """``corral keys create ARGS`` on the store ``env`` points at; the key is its last line."""
    made = subprocess.run(
        [*CORRAL, "keys", "create", *args], env=env, capture_output=True, text=True, timeout=60
    )
    assert made.returncode == 0, made.stderr
    return made.stdout.strip().splitlines()[-1]


class Server:
    def __init__(
        self,
        env: dict[str, str],
        log: Path,
        port: int | None = None,
        *,
        wrap: list[str] | None = None,
        host: str = "127.0.0.1",
        tls: ssl.SSLContext | None = None,
        args: tuple[str, ...] = (),
    ) -> None:
        """``wrap``: a command prefix the server runs under (``unshare …``); ``tls``: the client context that
        trusts the server's certificate, when ``env`` makes it serve HTTPS (``CORRAL_TLS_CERT``/``_KEY``);
        ``args``: more ``corral serve`` options (``--http2``)."""
        self.env, self.log, self.wrap, self.host, self.tls = env, log, wrap or [], host, tls
        self.args = args
        self.port = port if port is not None else free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    def start(self, timeout: float = 60) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [*self.wrap, *CORRAL, "serve", "--host", self.host, "--port", str(self.port), *self.args],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=2, context=self.tls):
                    return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.proc.kill()
                    raise RuntimeError(
                        f"corral serve did not start: {self.log.read_text()[-2000:]}"
                    ) from None
                time.sleep(0.05)  # polling a port with a bound: there is no event to wait on

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def check_ws_process_stdin(base_url: str, sandbox_id: str, key: str) -> None:
    """The interactive process WebSocket end to end: start a command reading stdin, send it a line, and check
    it echoed the line and exited 0 (what every server flavour must carry, uvicorn or hypercorn)."""
    import json

    from websockets.sync.client import connect

    url = base_url.replace("http", "ws", 1) + f"/v1/sandboxes/{sandbox_id}/processes/ws"
    with connect(url, additional_headers={"X-API-Key": key}) as ws:
        ws.send(json.dumps({"cmd": "read line; echo got:$line", "stdin": True}))
        assert json.loads(ws.recv())["kind"] == "started"
        ws.send(json.dumps({"stdin": "hello\n"}))
        events = []
        while (event := json.loads(ws.recv()))["kind"] != "exit":
            events.append(event)
        assert "".join(e.get("data", "") for e in events) == "got:hello\n" and event["exit_code"] == 0
