"""E2B's domain mode as an agent drives it: ``E2B_DOMAIN`` and ``E2B_API_KEY`` only (no E2B_API_URL, no
E2B_SANDBOX_URL), the CA in ``SSL_CERT_FILE``, names resolved by the test's DNS server. Sync then async, with
``e2b_code_interpreter.Sandbox``: create, commands.run, files write/read, a signed download URL, a server in
the sandbox at ``get_host(8080)``, run_code, kill; another tenant's key (``OTHER_E2B_API_KEY``) finds the sandbox NotFound. Run by test_domain_mode.py in
the test's network namespace; prints ``sandbox <id>`` per sandbox and ``e2b <version>: ok`` at the end."""

from __future__ import annotations

import asyncio
import importlib.metadata
import os
import sys
import time
import urllib.error
import urllib.request

from e2b_code_interpreter import AsyncSandbox, Sandbox

from e2b import NotFoundException

DOMAIN = os.environ["E2B_DOMAIN"]
assert "E2B_API_URL" not in os.environ and "E2B_SANDBOX_URL" not in os.environ
OTHER = os.environ["OTHER_E2B_API_KEY"]
CREATE = {"timeout": 300, "request_timeout": 1500}  # the first create builds the template


def sync_mode() -> None:
    sbx = Sandbox.create(**CREATE)  # type: ignore[arg-type]
    print("sandbox", sbx.sandbox_id, file=sys.stderr, flush=True)
    try:
        assert sbx.connection_config.api_url == f"https://api.{DOMAIN}", sbx.connection_config.api_url
        assert sbx.get_host(49983) == f"49983-{sbx.sandbox_id}.{DOMAIN}"
        r = sbx.commands.run('echo "hi-$A"; id -un', envs={"A": "1"})
        assert (r.stdout, r.exit_code) == ("hi-1\nuser\n", 0), r
        sbx.files.write("/home/user/d.txt", "domain mode")
        assert sbx.files.read("/home/user/d.txt") == "domain mode"
        url = sbx.download_url("/home/user/d.txt")
        assert url.startswith(f"https://49983-{sbx.sandbox_id}.{DOMAIN}/files?"), url
        with urllib.request.urlopen(url) as answer:  # Python's own TLS, trusting SSL_CERT_FILE
            assert answer.read() == b"domain mode"
        # a server in the sandbox, at the host name get_host() gives (E2B's ports are public by default)
        sbx.commands.run("python3 -m http.server 8080", background=True, timeout=0)
        listing = b""
        deadline = time.monotonic() + 30
        while b"d.txt" not in listing:
            try:
                with urllib.request.urlopen(f"https://{sbx.get_host(8080)}/", timeout=10) as answer:
                    listing = answer.read()
            except urllib.error.HTTPError as exc:  # 502 until it listens
                assert exc.code == 502 and time.monotonic() < deadline, exc
                time.sleep(0.2)
        execution = sbx.run_code("x = 6 * 7\nx")
        assert execution.error is None and execution.text == "42", execution
        assert sbx.run_code("x + 1").text == "43"  # state across cells
        try:
            Sandbox.connect(sbx.sandbox_id, api_key=OTHER)
            raise AssertionError("another tenant's key connected")
        except NotFoundException:
            pass
        assert sbx.is_running()
    finally:
        sbx.kill()
    assert not sbx.is_running()


async def async_mode() -> None:
    sbx = await AsyncSandbox.create(**CREATE)  # type: ignore[arg-type]
    print("sandbox", sbx.sandbox_id, file=sys.stderr, flush=True)
    try:
        out: list[str] = []
        r = await sbx.commands.run("echo a; echo b", on_stdout=out.append)
        assert r.stdout == "a\nb\n" and "".join(out) == "a\nb\n", r
        await sbx.files.write("/tmp/x.bin", b"\x00\x01domain")
        assert await sbx.files.read("/tmp/x.bin", format="bytes") == bytearray(b"\x00\x01domain")
        execution = await sbx.run_code("import sys; print(sys.version_info[0]); 2 ** 10")
        assert execution.text == "1024" and execution.logs.stdout == ["3\n"], execution
    finally:
        await sbx.kill()
    assert not await sbx.is_running()


sync_mode()
asyncio.run(async_mode())
print(f"e2b {importlib.metadata.version('e2b')}: ok", file=sys.stderr, flush=True)
os._exit(0)  # as envd_basics.py: pyqwest's threads can abort at interpreter teardown
