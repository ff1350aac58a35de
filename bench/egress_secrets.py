"""Cost of secret substitution: HTTPS through the intercepting egress proxy vs passed through, same run.

    .venv/bin/python bench/egress_secrets.py [--runs 30] [--downloads 3]     (as root)

A private "internet" made here (an upstream namespace with tests/network/_upstream.py on 198.18.0.0/15 and no
route out; Corral's egress uplink set to it, its certificate from a test CA given as the upstream trust).
Two namespace sandboxes with ``allow_out: [allowed.test]``: one with a secret bound to allowed.test (every
HTTPS connection there is terminated by the proxy, re-encrypted and parsed), one without (the proxy only
reads the SNI and relays bytes). From inside each, p50/p95 of a fresh connection + TLS handshake + one small
GET, and MiB/s of a 20 MiB download. Reported, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import tempfile
from pathlib import Path

from _stats import quantile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "network"))
from _pki import make_pki  # noqa: E402

UPSTREAM = ROOT / "tests" / "network" / "_upstream.py"
ZONE = {"allowed.test": ["198.18.1.1"]}
CLIENT = r"""
import json, socket, ssl, sys, time
runs, downloads = int(sys.argv[1]), int(sys.argv[2])
ctx = ssl.create_default_context()
ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # the same client work on both paths
socket.getaddrinfo("allowed.test", 443)
def get(path):
    t0 = time.perf_counter()
    s = ctx.wrap_socket(socket.create_connection(("198.18.1.1", 443), timeout=30), server_hostname="allowed.test")
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: allowed.test\r\nX-Key: x\r\nConnection: close\r\n\r\n".encode())
    n = 0
    while chunk := s.recv(1 << 20):
        n += len(chunk)
    s.close()
    return time.perf_counter() - t0, n
get("/")
setup = [get("/")[0] for _ in range(runs)]
rates = []
for _ in range(downloads):
    seconds, n = get("/bytes/20971520")
    assert n > 20971520, n
    rates.append(n / seconds / 2**20)
print(json.dumps({"setup": setup, "rates": rates}))
"""


def sh(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--downloads", type=int, default=3)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/egress_secrets.py needs root (network namespaces, nftables)")
    inet = f"corral-bench-sec-{secrets.token_hex(3)}"
    work = Path(tempfile.mkdtemp(prefix="corral-bench-secrets-"))
    (work / "zone.json").write_text(json.dumps(ZONE))
    make_pki(work, sorted(ZONE))
    proc = None
    sh("ip", "netns", "add", inet)
    try:
        sh("ip", "-n", inet, "link", "set", "lo", "up")
        for addr in ("198.18.0.53", "198.18.1.1"):
            sh("ip", "-n", inet, "addr", "add", f"{addr}/32", "dev", "lo")
        assert sh("ip", "-n", inet, "route", "show", "default").stdout.strip() == ""  # no way out
        proc = subprocess.Popen(
            ["ip", "netns", "exec", inet, sys.executable, str(UPSTREAM), str(work / "zone.json"),
             str(work / "cert.pem"), str(work / "key.pem")],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        os.environ.update(
            CORRAL_EGRESS_UPLINK_NETNS=f"/run/netns/{inet}",
            CORRAL_EGRESS_RESOLVERS="198.18.0.53",
            CORRAL_EGRESS_UPSTREAM_CA_FILE=str(work / "ca.pem"),
        )
        os.environ.pop("CORRAL_URL", None)
        results = {
            name: measure(secrets_, args)
            for name, secrets_ in (("passthrough", None), ("intercepted", {"K": "v"}))
        }
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
        subprocess.run(["ip", "netns", "del", inet], capture_output=True, timeout=30)
    for name, r in results.items():
        print(
            f"{name:12} setup p50 {quantile(r['setup'], 0.5) * 1000:.2f} ms  p95 {quantile(r['setup'], 0.95) * 1000:.2f} ms"
            f"   20 MiB download p50 {quantile(r['rates'], 0.5):.0f} MiB/s"
        )
    p, i = results["passthrough"], results["intercepted"]
    print(
        f"intercepted / passthrough: setup {quantile(i['setup'], 0.5) / quantile(p['setup'], 0.5):.2f}x, "
        f"throughput {quantile(i['rates'], 0.5) / quantile(p['rates'], 0.5):.2f}x"
    )


def measure(secrets_: dict[str, str] | None, args: argparse.Namespace) -> dict[str, list[float]]:
    from corral import Sandbox

    with Sandbox.create(
        isolation="namespace", network={"allow_out": ["allowed.test"]}, secrets=secrets_, timeout=600
    ) as sbx:
        done = sbx.commands.run(
            ["/usr/bin/python3", "-c", CLIENT, str(args.runs), str(args.downloads)], timeout=600
        )
        assert done.exit_code == 0, done.stderr
        return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


if __name__ == "__main__":
    main()
