"""Egress cost: connections and a 20 MiB download through a sandbox's policy, against two bare namespaces.

    .venv/bin/python bench/network.py [--runs 20] [--downloads 5] [--creates 10]     (as root)

Everything runs against a private "internet" made here: an upstream network namespace with the test
servers of tests/network/_upstream.py on 198.18.0.0/15 addresses and no route out. Nothing leaves this
machine: Corral's egress uplink is set to that namespace, and the script checks it has no default route.

Measured, p50 and p95, in the same run:

- connection setup: TCP connect + one small HTTP GET until its response arrives, from inside
  - **policy**: a sandbox network namespace made by Corral's egress stack (veth, nftables, the SNI/Host
    proxy deciding on the connection's Host against ``allow_out``, the proxy's upstream socket in the
    uplink namespace);
  - **bare**: two bare network namespaces joined by a veth pair (the same topology without Corral), the
    client in one and the same HTTP server in the other;
- 20 MiB download: the same two paths, MiB/s;
- create -> first output: ``Sandbox.create(network="internet")`` vs ``network="none"`` (namespace
  runtime, embedded SDK) until ``echo hi`` prints.

Ratios: policy / bare for setup and throughput, internet / none for create. Reported, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
from _stats import quantile

ROOT = Path(__file__).resolve().parents[1]
UPSTREAM = ROOT / "tests" / "network" / "_upstream.py"
ZONE = {"allowed.test": ["198.18.1.1"]}
CLIENT = r"""
import json, socket, sys, time
ip, host, runs, downloads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
def get(path):
    t0 = time.perf_counter()
    s = socket.create_connection((ip, 80), timeout=30)
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    n = 0
    first = None
    while True:
        chunk = s.recv(1 << 20)
        if not chunk:
            break
        if first is None:
            first = time.perf_counter() - t0
        n += len(chunk)
    s.close()
    return first, time.perf_counter() - t0, n
get("/")
setup = [get("/")[0] for _ in range(runs)]
mib = []
for _ in range(downloads):
    _, took, n = get("/bytes/20971520")
    assert n >= 20971520, n
    mib.append(20 / took)
print(json.dumps({"setup": setup, "mib_s": mib}))
"""


def sh(*argv: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), check=True, capture_output=True, text=True, timeout=120, **kw)  # type: ignore[call-overload, no-any-return]


def ms(samples: list[float]) -> str:
    return f"p50 {quantile(samples, 0.5) * 1000:7.2f} ms  p95 {quantile(samples, 0.95) * 1000:7.2f} ms"


def start_upstream(netns: str, work: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        ["ip", "netns", "exec", netns, sys.executable, str(UPSTREAM), str(work / "zone.json"),
         str(work / "cert.pem"), str(work / "key.pem")],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
    return proc


def client(netns: str, ip: str, runs: int, downloads: int) -> dict[str, list[float]]:
    done = sh(
        "ip",
        "netns",
        "exec",
        netns,
        "/usr/bin/python3",
        "-c",
        CLIENT,
        ip,
        "allowed.test",
        str(runs),
        str(downloads),
    )
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--downloads", type=int, default=5)
    parser.add_argument("--creates", type=int, default=10)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/network.py needs root (network namespaces, nftables)")
    tag = secrets.token_hex(3)
    inet, bare_a, bare_b = f"corral-bench-inet-{tag}", f"corral-bench-a-{tag}", f"corral-bench-b-{tag}"
    work = Path(tempfile.mkdtemp(prefix="corral-bench-net-"))
    (work / "zone.json").write_text(json.dumps(ZONE))
    sh("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=bench", "-days", "1",
       "-keyout", str(work / "key.pem"), "-out", str(work / "cert.pem"))  # fmt: skip
    procs: list[subprocess.Popen[bytes]] = []
    made = [inet, bare_a, bare_b]
    try:
        for ns in made:
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        for addr in ("198.18.0.53", "198.18.1.1"):
            sh("ip", "-n", inet, "addr", "add", f"{addr}/32", "dev", "lo")
        assert sh("ip", "-n", inet, "route", "show", "default").stdout.strip() == ""  # no way out
        # the bare baseline: client namespace A --veth-- server namespace B, nothing else
        sh(
            "ip",
            "link",
            "add",
            f"cbA{tag}",
            "netns",
            bare_a,
            "type",
            "veth",
            "peer",
            "name",
            f"cbB{tag}",
            "netns",
            bare_b,
        )
        sh("ip", "-n", bare_a, "addr", "add", "198.18.9.1/30", "dev", f"cbA{tag}")
        sh("ip", "-n", bare_b, "addr", "add", "198.18.9.2/30", "dev", f"cbB{tag}")
        sh("ip", "-n", bare_a, "link", "set", f"cbA{tag}", "up")
        sh("ip", "-n", bare_b, "link", "set", f"cbB{tag}", "up")
        procs.append(start_upstream(inet, work))
        procs.append(start_upstream(bare_b, work))
        os.environ["CORRAL_EGRESS_UPLINK_NETNS"] = f"/run/netns/{inet}"
        os.environ["CORRAL_EGRESS_RESOLVERS"] = "198.18.0.53"
        results = run_paths(inet, bare_a, args, work)
        creates = run_creates(args.creates)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
    report(results, creates)


def run_paths(
    inet: str, bare_a: str, args: argparse.Namespace, work: Path
) -> dict[str, dict[str, list[float]]]:
    from corral.ids import SandboxId
    from corral.netpolicy import NetworkPolicy
    from corral.runtimes._net import stack
    from corral.runtimes._net.config import EgressConfig

    config = EgressConfig(uplink_netns=f"/run/netns/{inet}", resolvers=("198.18.0.53",))
    assert config.uplink_netns == os.environ["CORRAL_EGRESS_UPLINK_NETNS"]
    sid = SandboxId.new()
    policy = NetworkPolicy.parse({"allow_out": ["198.18.1.1/32:80"]})
    net = anyio.run(stack.setup, sid, work / sid, policy, config)
    try:
        out = {"policy": client(net.plan.netns, "198.18.1.1", args.runs, args.downloads)}
    finally:
        anyio.run(stack.teardown, net)
    out["bare"] = client(bare_a, "198.18.9.2", args.runs, args.downloads)
    return out


def run_creates(runs: int) -> dict[str, list[float]]:
    from corral import Sandbox
    from corral.models import EventKind

    out: dict[str, list[float]] = {"none": [], "internet": []}
    for _ in range(runs):
        for network in ("none", "internet"):
            t0 = time.perf_counter()
            with Sandbox.create(isolation="namespace", network=network, timeout=60) as sbx:
                for event in sbx.commands.stream(["echo", "hi"]):
                    if event.kind is EventKind.STDOUT:
                        out[network].append(time.perf_counter() - t0)
                        break
    return out


def report(paths: dict[str, dict[str, list[float]]], creates: dict[str, list[float]]) -> None:
    policy, bare = paths["policy"], paths["bare"]
    print("connection setup (connect + small GET, to first response byte)")
    print(f"  policy (veth + nft + proxy)   {ms(policy['setup'])}")
    print(f"  bare namespaces (veth)        {ms(bare['setup'])}")
    print(
        f"  ratio policy/bare p50         {quantile(policy['setup'], 0.5) / quantile(bare['setup'], 0.5):.2f}x"
    )
    print("20 MiB download")
    p50p, p50b = quantile(policy["mib_s"], 0.5), quantile(bare["mib_s"], 0.5)
    print(f"  policy                        p50 {p50p:8.1f} MiB/s")
    print(f"  bare namespaces               p50 {p50b:8.1f} MiB/s")
    print(f"  ratio policy/bare throughput  {p50p / p50b:.2f}x")
    print("create -> first output (namespace runtime, embedded)")
    print(f"  network=none                  {ms(creates['none'])}")
    print(f"  network=internet              {ms(creates['internet'])}")
    print(
        f"  ratio internet/none p50       {quantile(creates['internet'], 0.5) / quantile(creates['none'], 0.5):.2f}x"
    )


if __name__ == "__main__":
    main()
