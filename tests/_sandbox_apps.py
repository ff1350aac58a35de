"""Servers that tests run inside sandboxes, and the Python packages they need, taken from this virtualenv.

Sandboxes of the ``base`` template run the host's ``/usr/bin/python3`` with no network, so they cannot pip
install. The test virtualenv is built on that same interpreter, so its installed distributions (wheels for
this CPython and this machine) work inside unchanged: :func:`site_tarball` packs a distribution and all it
requires into a tar.gz to upload, unpack and put on ``PYTHONPATH`` in the sandbox.
"""

from __future__ import annotations

import functools
import io
import os
import re
import signal
import socket
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

SITE_DIR = "/tmp/site"  # where tests unpack it inside the sandbox


def _closure(names: tuple[str, ...]) -> list[metadata.Distribution]:
    seen: dict[str, metadata.Distribution] = {}
    todo = [Requirement(n) for n in names]
    while todo:
        req = todo.pop()
        key = canonicalize_name(req.name)
        if key in seen:
            continue
        dist = metadata.distribution(req.name)
        seen[key] = dist
        for line in dist.requires or []:
            dep = Requirement(line)
            wanted = [{"extra": e} for e in req.extras] or [{"extra": ""}]
            if dep.marker is None or any(dep.marker.evaluate(env) for env in wanted):
                todo.append(dep)
    return list(seen.values())


@functools.cache
def site_tarball(*names: str) -> bytes:
    """A tar.gz of the named distributions and their dependencies, rooted at site-packages."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as tar:
        for dist in _closure(names):
            for file in dist.files or []:
                if file.parts[0] == ".." or "__pycache__" in file.parts:
                    continue
                path = Path(str(dist.locate_file(file)))
                if path.is_file():
                    tar.add(path, arcname=str(file), recursive=False)
    return buf.getvalue()


APPS = Path(__file__).parent / "sandbox_apps"

# A line echo server: "RAW n" echoes the next n bytes verbatim; after the client's half-close it still says bye.
ECHO_SERVER = r"""
import socket, sys, threading
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", int(sys.argv[1])))
srv.listen(64)
print("listening", flush=True)
def serve(c):
    with c:
        f = c.makefile("rb")
        for line in f:
            if line.startswith(b"RAW "):   # RAW n: echo the next n bytes verbatim
                n = int(line[4:])
                while n:
                    chunk = f.read1(min(n, 1 << 16))
                    c.sendall(chunk)
                    n -= len(chunk)
                continue
            c.sendall(b"echo: " + line)
        c.sendall(b"bye\n")   # the client half-closed; we still talk
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


def memory_probe(directory: str) -> str:
    """A process whose state lives only in its memory: a random token drawn at start and a counter, written
    to ``{directory}/probe`` every 20 ms. The same token with a larger counter after a pause, restore or
    fork proves that the very process came back with its variables (a new process draws a new token)."""
    return (
        "import os, time\n"
        "token = os.urandom(8).hex()\n"
        "x = 0\n"
        "while True:\n"
        "    x += 1\n"
        f"    open('{directory}/probe.tmp', 'w').write(f'{{token}} {{x}}')\n"
        f"    os.rename('{directory}/probe.tmp', '{directory}/probe')\n"
        "    time.sleep(0.02)\n"
    )


def recv_until(sock: socket.socket, marker: bytes) -> bytes:
    """Read until ``marker`` has arrived (or the peer closed)."""
    data = b""
    while marker not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def wait_for_line(handle: Any, text: str) -> None:
    """Follow a background command's output until ``text`` appears (it exiting first fails the test)."""
    seen = ""
    for event in handle.events():
        seen += event.text
        if text in seen:
            return
    raise AssertionError(f"the server exited before saying {text!r}: {seen}")


def start_python_app(sbx: Any, app: str, *args: str, packages: tuple[str, ...]) -> Any:
    """Upload ``sandbox_apps/{app}`` and the ``packages`` it imports, start it, and wait for its "ready"."""
    sbx.files.write("/tmp/site.tgz", site_tarball(*packages))
    sbx.commands.run(f"mkdir -p {SITE_DIR} && tar -xzf /tmp/site.tgz -C {SITE_DIR}", check=True, timeout=120)
    sbx.files.write(f"/tmp/{app}", (APPS / app).read_bytes())
    handle = sbx.commands.start(["python3", "-u", f"/tmp/{app}", *args], envs={"PYTHONPATH": SITE_DIR})
    wait_for_line(handle, "ready")
    return handle


@contextmanager
def cli_forward(sandbox_id: str, port: int) -> Iterator[int]:
    """``corral sandbox forward SANDBOX PORT`` as a subprocess; yields the local port it printed, and checks
    that SIGTERM ends it cleanly (exit 0) when the block ends."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "corral.cli.main", "sandbox", "forward", sandbox_id, str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "NO_COLOR": "1"},
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        line = proc.stdout.readline().decode()
        match = re.match(rf"Forwarding from 127\.0\.0\.1:(\d+) -> {sandbox_id} port {port}", line)
        assert match, (line, proc.stderr.read() if proc.poll() is not None else "")
        yield int(match[1])
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    assert code == 0, proc.stderr.read()
