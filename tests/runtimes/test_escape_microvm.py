"""Hostile code inside a microVM, as the guest's root (the worst case), must not reach the host.

The same attempts as the namespace and gVisor escape tests, with the outcomes a VM boundary gives: inside,
root may mount, load modules and write devices, but every one of those is the guest kernel's own; the host's
processes, files, loopback, devices, mount table and modules are out of reach, the shared disk images stay
unchanged, and the VM cannot grow past its memory or fill the host's disk through its console.
"""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path
from typing import Any

import anyio
import pytest

from corral.errors import RuntimeFailure

pytestmark = [pytest.mark.root, pytest.mark.qemu, pytest.mark.anyio]


def _results(text: str) -> dict[str, str]:
    return dict(line.split(None, 1) for line in text.splitlines() if line.strip())


def _vm_disks(sb: Any) -> list[dict[str, Any]]:
    import json

    return list(json.loads((sb.state_dir / "vm.json").read_text())["disks"])


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except FileNotFoundError:  # a host kernel without loadable modules has no /proc/modules
        return ""


def _exists(path: str) -> bool:
    return Path(path).exists()


def _digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _qemu_rss_mb(sb: Any) -> float:
    from corral.runtimes.microvm.hostside import vm_processes as _vm_processes

    (pid,) = _vm_processes(sb.state_dir)
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _proc_status(pid: int) -> dict[str, str]:
    return dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())


async def test_host_processes_are_invisible(microvm_sandbox: Any) -> None:
    sb = await microvm_sandbox()
    ps = (await sb.run(["ps", "-eo", "pid,args"])).out
    assert "_shim.py" not in ps and "pytest" not in ps and "qemu" not in ps
    pids = {int(line.split()[0]) for line in ps.splitlines()[1:]}
    assert str(os.getpid()) not in {str(p) for p in pids if p > 1000} or os.getpid() < 1000
    assert (await sb.run("cat /proc/1/cmdline")).out.count("corral.agent") == 1  # the guest's PID 1


async def test_host_files_are_invisible(microvm_sandbox: Any, corral_data_dir: Path, tmp_path: Path) -> None:
    secret = tmp_path / "host-secret.txt"
    secret.write_text("top secret")
    sb = await microvm_sandbox()
    for path in (str(secret), str(corral_data_dir), str(sb.state_dir), "/work", "/etc/ssh", "/var/lib/dpkg"):
        assert (await sb.run(["test", "-e", path])).exit_code == 1, f"{path} is visible in the guest"
    assert (await sb.run("ls -A /root")).out == ""
    shadow = (await sb.run("cat /etc/shadow")).out
    assert shadow.startswith("root:*:") and shadow != _read("/etc/shadow")
    # the guest's block devices are its own disks, and nothing else
    devices = sorted((await sb.run("ls /sys/block")).out.split())
    assert devices == [f"vd{chr(ord('a') + i)}" for i in range(len(_vm_disks(sb)))], devices


async def test_shared_images_stay_unchanged_even_for_root_with_raw_devices(microvm_sandbox: Any) -> None:
    sb = await microvm_sandbox()
    shared = [d["path"] for d in _vm_disks(sb) if d["readonly"]]
    before = {p: _digest(p) for p in shared}
    for target in ("/usr/bin/corral-evil", "/.corral/evil", "/.corral/bin/python3"):
        result = await sb.run(f"echo x > {target}")
        assert result.exit_code != 0 and b"Read-only file system" in result.stderr, target
    assert (await sb.run("mount -o remount,rw /usr")).exit_code != 0
    # every read-only disk, written raw as root, through the block layer: the VMM refuses
    raw = await sb.run(
        "for d in /sys/block/vd*; do ro=$(cat $d/ro); n=${d##*/};"
        " if [ $ro = 1 ]; then dd if=/dev/zero of=/dev/$n bs=4096 count=1 conv=fsync 2>/dev/null"
        " && echo $n WROTE || echo $n refused; fi; done"
    )
    answers = _results(raw.out)
    assert answers and set(answers.values()) == {"refused"}, raw.out
    assert {p: _digest(p) for p in shared} == before
    assert not _exists("/usr/bin/corral-evil")


async def test_no_route_to_the_hosts_loopback(microvm_sandbox: Any) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        server.setblocking(False)
        port = server.getsockname()[1]
        sb = await microvm_sandbox()
        probe = (
            "import socket\n"
            "for host in ('127.0.0.1', '10.0.2.2', '192.168.0.1'):\n"
            "    try:\n"
            f"        socket.create_connection((host, {port}), timeout=2).close(); print(host, 'OK')\n"
            "    except OSError as e:\n"
            "        print(host, type(e).__name__)\n"
        )
        answers = _results((await sb.run(["python3", "-c", probe])).out)
        assert answers["127.0.0.1"] == "ConnectionRefusedError"  # the guest's own loopback: nobody there
        assert answers["10.0.2.2"] == "OSError" and answers["192.168.0.1"] == "OSError"  # no route at all
        with pytest.raises(BlockingIOError):
            server.accept()
    assert (await sb.run("ls /sys/class/net")).out.split() == ["lo"]  # no NIC was ever attached


async def test_mounts_and_modules_inside_are_the_guests_own(microvm_sandbox: Any) -> None:
    host_modules = _read("/proc/modules")
    sb = await microvm_sandbox()
    assert (await sb.run("mkdir -p /mnt/x && mount -t tmpfs evil /mnt/x && touch /mnt/x/f")).exit_code == 0
    assert (await sb.run("mount --bind / /mnt/x && umount /mnt/x && umount /mnt/x")).exit_code == 0
    guest_modules = (await sb.run("cut -d' ' -f1 /proc/modules")).out.split()
    assert "virtio_blk" in guest_modules  # the initramfs's, in the guest kernel
    assert (await sb.run("rmmod virtio_console")).exit_code != 0  # in use by the agent's own port
    assert _read("/proc/modules") == host_modules
    # (other tests on this host mount and unmount meanwhile: look for the guest's mounts, not for equality)
    assert not [m for m in _read("/proc/self/mountinfo").splitlines() if " evil " in m or "/mnt/x" in m]


async def test_no_host_devices(microvm_sandbox: Any) -> None:
    sb = await microvm_sandbox()
    for dev in ("/dev/kvm", "/dev/vhost-net", "/dev/net/tun", "/dev/sda", "/dev/nvme0n1"):
        assert (await sb.run(["test", "-e", dev])).exit_code == 1, dev
    # root may make device nodes; they reach the guest kernel's drivers only (no such hardware there)
    assert (await sb.run("mknod /tmp/kvm c 10 232 && cat /tmp/kvm")).exit_code != 0


async def test_sandboxes_cannot_see_each_other(microvm_sandbox: Any) -> None:
    a = await microvm_sandbox()
    b = await microvm_sandbox()
    await a.run("echo mine > /root/private; sleep 600 >/dev/null 2>&1 &")
    assert (await b.run("cat /root/private")).exit_code != 0
    assert (await b.run("pgrep -x sleep")).exit_code == 1
    assert _vm_disks(a)[0]["path"] == _vm_disks(b)[0]["path"]  # they share the read-only template image…
    uppers = {d["path"] for sb in (a, b) for d in _vm_disks(sb) if not d["readonly"]}
    assert len(uppers) == 2  # … and each writes only to its own disk


async def test_memory_and_console_floods_stay_inside(microvm_sandbox: Any) -> None:
    sb = await microvm_sandbox()
    bomb = await sb.run(
        "python3 -c 'x = []\nwhile True: x.append(bytearray(16 << 20))'", timeout=120
    )  # the guest's OOM killer ends it, not the host's
    assert bomb.signal == 9 or bomb.exit_code in (137, -9), bomb
    assert (await sb.run("echo alive")).out == "alive\n"  # the agent (PID 1) is never the OOM victim
    assert _qemu_rss_mb(sb) < 512 + 300  # the VM's RAM + TCG's code cache and QEMU itself
    console = sb.state_dir / "console.log"
    size = console.stat().st_size
    await sb.run("dd if=/dev/zero of=/dev/ttyS0 bs=1M count=20 2>/dev/null; echo done", timeout=120)
    await anyio.sleep(0.5)
    assert console.stat().st_size == size  # after boot the console is a 64 KiB ring in QEMU, not a file


async def test_a_compromised_qemu_is_an_unprivileged_stranger_on_the_host(
    microvm_sandbox: Any, tmp_path: Path
) -> None:
    """Code that took over QEMU (a device-emulation bug) runs as the VM's own uid, without capabilities, and
    under QEMU's seccomp filter (which also denies spawning programs): it cannot read root's files. Driven here through QMP,
    which makes QEMU itself open a file, as such code would."""
    from corral.runtimes._uids import UidAllocator
    from corral.runtimes.microvm import qmp
    from corral.runtimes.microvm.hostside import vm_processes

    sb = await microvm_sandbox()
    other = await microvm_sandbox()
    (pid,) = vm_processes(sb.state_dir)
    status = _proc_status(pid)
    uids = {int(u) for u in status["Uid"].split()} | {int(g) for g in status["Gid"].split()}
    assert len(uids) == 1 and uids.pop() >= UidAllocator.UID_BASE  # real, effective, saved, fs: one stranger
    assert int(status["CapEff"], 16) == int(status["CapPrm"], 16) == 0
    assert status["Groups"].split() in ([], status["Gid"].split()[:1])  # no supplementary host group
    assert int(status["Seccomp"]) == 2  # QEMU's own filter is loaded
    (other_pid,) = vm_processes(other.state_dir)
    assert _proc_status(other_pid)["Uid"] != status["Uid"]  # one uid per VMM

    secret = tmp_path / "root-only"
    secret.write_text("host secret\n")
    secret.chmod(0o600)
    with pytest.raises(RuntimeFailure) as refused:
        await anyio.to_thread.run_sync(
            lambda: qmp.command(
                sb.state_dir / "qmp.sock",
                "blockdev-add",
                driver="file",
                filename=str(secret),
                **{"node-name": "stolen", "read-only": True},
            )
        )
    assert "Permission denied" in str(refused.value.__cause__)
    # the VM it serves still works, and its disks (opened by root before the drop) are all there
    assert (await sb.run("echo fine")).out == "fine\n"
