"""The firecracker and cloud-hypervisor engines, as far as this host can check them.

Neither VMM is installed here (no registry ships them) and /dev/kvm must not be used, so these tests check
what the engines would send (against the documented API shapes, transcribed below from Firecracker's
``firecracker.yaml`` and cloud-hypervisor's ``cloud-hypervisor.yaml``), the REST client and the hybrid-vsock
handshake against small stand-ins for a VMM's sockets (named as such), option parsing and the typed errors.
The tests that start a real VMM skip unless its binary is on PATH and /dev/kvm exists (checked in that order,
by name only: nothing here opens /dev/kvm).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from socketserver import ThreadingMixIn, UnixStreamServer
from typing import Any

import pytest

from corral.errors import InvalidRequest, RuntimeFailure, RuntimeUnavailable
from corral.runtimes.microvm.firecracker import CloudHypervisorEngine, FirecrackerEngine
from corral.runtimes.microvm.guest import INIT
from corral.runtimes.microvm.rest import Call, RestApi, vsock_connect
from corral.runtimes.microvm.runtime import MicroVMOptions, MicroVMRuntime
from corral.runtimes.microvm.vm import AGENT_SERIAL, UPPER_SERIAL, Disk, VmConfig

# endpoint → (required keys, allowed keys, {key: allowed values}) as the two APIs document their bodies
FIRECRACKER_API: dict[tuple[str, str], tuple[set[str], set[str], dict[str, set[Any]]]] = {
    ("PUT", "/boot-source"): ({"kernel_image_path"}, {"kernel_image_path", "initrd_path", "boot_args"}, {}),
    ("PUT", "/machine-config"): (
        {"vcpu_count", "mem_size_mib"},
        {"vcpu_count", "mem_size_mib", "smt", "cpu_template", "track_dirty_pages", "huge_pages"},
        {},
    ),
    ("PUT", "/drives/"): (
        {"drive_id", "is_root_device"},
        {"drive_id", "path_on_host", "is_root_device", "is_read_only", "partuuid", "cache_type", "io_engine"},
        {},
    ),
    ("PUT", "/vsock"): ({"guest_cid", "uds_path"}, {"guest_cid", "uds_path", "vsock_id"}, {}),
    ("PUT", "/actions"): (
        {"action_type"},
        {"action_type"},
        {"action_type": {"InstanceStart", "FlushMetrics"}},
    ),
    ("PATCH", "/vm"): ({"state"}, {"state"}, {"state": {"Paused", "Resumed"}}),
    ("PUT", "/snapshot/create"): (
        {"snapshot_path", "mem_file_path"},
        {"snapshot_path", "mem_file_path", "snapshot_type"},
        {"snapshot_type": {"Full", "Diff"}},
    ),
    ("PUT", "/snapshot/load"): (
        {"snapshot_path"},
        {"snapshot_path", "mem_backend", "mem_file_path", "resume_vm", "enable_diff_snapshots"},
        {},
    ),
}
CH_VM_CONFIG = {"cpus", "memory", "payload", "disks", "vsock", "serial", "console", "net", "rng", "platform"}
CH_DISK = {"path", "readonly", "direct", "iommu", "num_queues", "queue_size", "id", "serial", "pci_segment"}
CONSOLE_MODES = {"Off", "Pty", "Tty", "File", "Socket", "Null"}


def _conforms(call: Call) -> None:
    key = (call.method, "/drives/" if call.path.startswith("/drives/") else call.path)
    assert key in FIRECRACKER_API, f"undocumented endpoint {call.method} {call.path}"
    required, allowed, enums = FIRECRACKER_API[key]
    assert call.body is not None
    assert required <= call.body.keys() <= allowed, (call.path, sorted(call.body))
    for field, values in enums.items():
        assert call.body[field] in values


def _config() -> VmConfig:
    return VmConfig(
        kernel="/cache/vmlinuz-6.1",
        initramfs="/cache/initramfs-abc.cpio",
        memory_mb=512,
        vcpus=2,
        disks=(
            Disk(serial="corral-l0", path="/cache/erofs/l0.erofs"),
            Disk(serial=UPPER_SERIAL, path="/state/sb-1/upper.raw", readonly=False),
            Disk(serial=AGENT_SERIAL, path="/cache/erofs/agent.erofs"),
        ),
        args={"pids": "128", "hostname": "sandbox"},
    )


def test_firecracker_sends_the_documented_bodies_for_a_machine_without_a_nic() -> None:
    calls = FirecrackerEngine().machine(_config())
    for call in calls:
        _conforms(call)
    by_path = {c.path: c.body for c in calls}
    assert by_path["/machine-config"] == {"vcpu_count": 2, "mem_size_mib": 512, "smt": False}
    boot = by_path["/boot-source"]
    assert boot is not None and boot["kernel_image_path"] == "/vmlinuz-6.1"  # inside the jail's chroot
    assert "corral.pids=128" in boot["boot_args"].split()
    drives = [c.body for c in calls if c.path.startswith("/drives/")]
    assert [(d["drive_id"], d["is_read_only"]) for d in drives if d] == [
        ("corral_l0", True),
        ("corral_upper", False),
        ("corral_agent", True),
    ]
    assert not any(
        d and d["is_root_device"] for d in drives
    )  # the initramfs is the root, disks are found by id
    assert calls[-1].path == "/actions" and calls[-1].body == {
        "action_type": "InstanceStart"
    }  # configured first
    assert not any("network" in c.path for c in calls)  # no NIC at all
    _conforms(FirecrackerEngine.snapshot_call("/snap/vm", "/snap/memory"))
    load = FirecrackerEngine.load_call("/snap/vm", "/snap/memory")
    _conforms(load)
    assert load.body is not None and load.body["mem_backend"] == {
        "backend_type": "File",
        "backend_path": "/snap/memory",
    }


def test_the_guest_init_finds_a_disk_by_either_engines_serial(tmp_path: Path) -> None:
    """The guest's /init ``disk`` function itself (busybox ash, as in the guest) over a stand-in /sys/block:
    QEMU's serial (``corral-upper``) and Firecracker's drive id (``corral_upper``) name the same disk, and
    no other disk is taken for it."""
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.skip("busybox is not installed")
    func = INIT[INIT.index("disk() {") :]
    func = func[: func.index("\n}\n") + 3].replace("/sys/block/", f"{tmp_path}/block/")
    for name, serial in (("vda", "corral_l0"), ("vdb", "corral-upperx"), ("vdc", "corral_upper")):
        (tmp_path / "block" / name).mkdir(parents=True)
        (tmp_path / "block" / name / "serial").write_text(serial)
    script = func + 'usleep() { :; }\ndisk "$1"\n'
    found = subprocess.run([busybox, "sh", "-c", script, "sh", UPPER_SERIAL], capture_output=True, text=True)
    assert found.returncode == 0 and found.stdout == "/dev/vdc\n"
    (tmp_path / "block" / "vdc" / "serial").write_text(UPPER_SERIAL)  # QEMU's spelling
    found = subprocess.run([busybox, "sh", "-c", script, "sh", UPPER_SERIAL], capture_output=True, text=True)
    assert found.stdout == "/dev/vdc\n"
    missing = subprocess.run(
        [busybox, "sh", "-c", script.replace("500", "3"), "sh", AGENT_SERIAL], capture_output=True, text=True
    )
    assert missing.returncode == 1 and missing.stdout == ""


def test_firecracker_takes_raw_disks_only_and_runs_jailed_as_the_vms_own_uid(tmp_path: Path) -> None:
    base = _config()
    qcow = replace(base, disks=tuple(replace(d, format="qcow2") if not d.readonly else d for d in base.disks))
    with pytest.raises(InvalidRequest, match="raw disks only"):
        FirecrackerEngine().machine(qcow)
    argv = FirecrackerEngine().jailer_argv(
        "/usr/bin/firecracker", "/usr/bin/jailer", tmp_path, "sb-abc", 1_000_065_536
    )
    assert argv[argv.index("--uid") + 1] == argv[argv.index("--gid") + 1] == "1000065536"
    assert "--new-pid-ns" in argv and argv[argv.index("--chroot-base-dir") + 1] == str(tmp_path / "jail")
    assert argv[argv.index("--") + 1 :] == ["--api-sock", "/run/firecracker.socket"]
    with pytest.raises(InvalidRequest):
        FirecrackerEngine().jailer_argv("/f", "/j", tmp_path, "../escape", 1_000_065_536)


def test_cloud_hypervisor_sends_the_documented_vm_config(tmp_path: Path) -> None:
    create, boot = CloudHypervisorEngine().machine(_config(), tmp_path)
    assert (create.method, create.path, boot.method, boot.path) == (
        "PUT",
        "/api/v1/vm.create",
        "PUT",
        "/api/v1/vm.boot",
    )
    body = create.body
    assert body is not None and "payload" in body and set(body) <= CH_VM_CONFIG
    assert "net" not in body  # no NIC
    assert body["cpus"] == {"boot_vcpus": 2, "max_vcpus": 2}
    assert body["memory"] == {"size": 512 * 1024 * 1024}  # bytes, not MiB
    assert set(body["payload"]) <= {"firmware", "kernel", "cmdline", "initramfs"}
    for disk in body["disks"]:
        assert set(disk) <= CH_DISK
    assert [d["serial"] for d in body["disks"]] == [
        "corral-l0",
        UPPER_SERIAL,
        AGENT_SERIAL,
    ]  # what /init looks for
    assert body["vsock"] == {"cid": 3, "socket": str(tmp_path / "vsock.sock")}
    assert body["serial"]["mode"] in CONSOLE_MODES and body["console"] == {"mode": "Off"}
    assert CloudHypervisorEngine.snapshot_call(tmp_path).body == {"destination_url": tmp_path.as_uri()}
    assert CloudHypervisorEngine.restore_call(tmp_path).body == {"source_url": tmp_path.as_uri()}


def test_the_engine_option_is_checked_and_a_missing_vmm_names_what_to_install(
    runtime_config: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert MicroVMOptions().engine == "qemu"
    with pytest.raises(InvalidRequest, match="engine must be one of qemu, firecracker, cloud-hypervisor"):
        MicroVMOptions(engine="xen")
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on PATH: the binary is looked for first
    for options, binary in (
        (MicroVMOptions(engine="firecracker"), "firecracker"),
        (MicroVMOptions(engine="cloud-hypervisor"), "cloud-hypervisor"),
    ):
        with pytest.raises(RuntimeUnavailable) as missing:
            MicroVMRuntime(runtime_config, options).check_host()
        assert missing.value.details["binary"] == binary and "PATH" in missing.value.details["install"]
    # binaries found (empty stand-in executables): the refusal says what is missing instead of starting
    for name in ("firecracker", "jailer", "cloud-hypervisor"):
        (tmp_path / name).write_text("#!/bin/sh\nexit 1\n")
        (tmp_path / name).chmod(0o755)
    for engine in ("firecracker", "cloud-hypervisor"):
        with pytest.raises(RuntimeUnavailable, match="agent relay"):
            MicroVMRuntime(runtime_config, MicroVMOptions(engine=engine)).check_host()


# --- stand-ins for a VMM's two sockets --------------------------------------------------------------------
class _UnixHTTPServer(ThreadingMixIn, UnixStreamServer):
    daemon_threads = True


@pytest.fixture
def standin_api(tmp_path: Path) -> Iterator[tuple[Path, list[tuple[str, str, Any]]]]:
    """A stand-in for a VMM's REST socket (no VMM can run here): records requests, refuses /bad with a
    Firecracker-style fault message."""
    seen: list[tuple[str, str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            seen.append((self.command, self.path, body))
            status, reply = (
                (400, {"fault_message": "bad thing at /secret/host/path"})
                if self.path == "/bad"
                else (200, {"state": "Paused"})
            )
            data = json.dumps(reply).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_PUT = do_PATCH = _answer

        def address_string(self) -> str:
            return "standin"

        def log_message(self, *args: Any) -> None:
            pass

    sock = tmp_path / "api.sock"
    server = _UnixHTTPServer(str(sock), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield sock, seen
    finally:
        server.shutdown()
        server.server_close()


def test_the_rest_client_speaks_http_over_the_unix_socket(standin_api: tuple[Path, list[Any]]) -> None:
    sock, seen = standin_api
    api = RestApi(sock)
    assert api.send(Call("PATCH", "/vm", {"state": "Paused"})) == {"state": "Paused"}
    assert seen == [("PATCH", "/vm", {"state": "Paused"})]
    with pytest.raises(RuntimeFailure) as refused:
        api.send(Call("PUT", "/bad", {}))
    assert "/secret" not in str(refused.value)  # the VMM's words go to the log, not to clients
    with pytest.raises(RuntimeFailure, match="does not answer"):
        RestApi(sock.with_name("nothing.sock")).send(Call("GET", "/"))


def test_the_hybrid_vsock_handshake(tmp_path: Path) -> None:
    """Against a stand-in for the VMM's vsock socket: ``CONNECT 1024`` → ``OK <port>``, then the guest's
    stream (here an echo), with nothing of the handshake left in it; a refusal is a RuntimeFailure."""
    uds = tmp_path / "vsock.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(uds))
    listener.listen(2)

    def serve() -> None:
        for answer in (b"OK 1073741824\n", b""):
            conn, _ = listener.accept()
            with conn:
                line = b""
                while not line.endswith(b"\n"):
                    line += conn.recv(1)
                if not answer:
                    continue  # refuses: closes the connection, as Firecracker does for a closed port
                assert line == b"CONNECT 1024\n"
                conn.sendall(answer + b"first-bytes")
                conn.sendall(conn.recv(100))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    stream = vsock_connect(uds, 1024)
    with stream:
        assert stream.recv(11) == b"first-bytes"
        stream.sendall(b"ping")
        assert stream.recv(4) == b"ping"
    with pytest.raises(RuntimeFailure, match="vsock port 1024"):
        vsock_connect(uds, 1024)
    thread.join(5)
    listener.close()


# --- real VMMs, where they exist ----------------------------------------------------------------------------
def _vmm_or_skip(binary: str) -> str:
    found = shutil.which(binary)
    if found is None:
        pytest.skip(f"{binary} is not on PATH (no registry ships it; it needs a host with working KVM)")
    if not os.path.exists("/dev/kvm"):  # by name only, after the binary was found: never opened here
        pytest.skip(f"{binary} needs /dev/kvm")
    return found


@pytest.mark.root
def test_cloud_hypervisor_pauses_and_resumes_a_real_vm(tmp_path: Path) -> None:
    binary = _vmm_or_skip("cloud-hypervisor")
    import subprocess
    import time

    from corral.runtimes.microvm.guest import ensure_guest

    guest = ensure_guest(Path(os.environ.get("CORRAL_RUNTIME_MICROVM_CACHE_DIR", tmp_path)))
    engine = CloudHypervisorEngine()
    config = VmConfig(
        kernel=str(guest.kernel), initramfs=str(guest.initramfs), memory_mb=256, vcpus=1, disks=()
    )
    proc = subprocess.Popen(
        engine.argv(binary, tmp_path), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 10
        while not (tmp_path / "ch.sock").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "cloud-hypervisor did not start"
            time.sleep(0.01)
        api = RestApi(tmp_path / "ch.sock")
        for call in engine.machine(config, tmp_path):
            api.send(call)
        engine.pause(tmp_path)
        assert engine.status(tmp_path) == "paused"
        engine.resume(tmp_path)
        assert engine.status(tmp_path) == "running"
    finally:
        proc.kill()
        proc.wait()
