"""Hostile code inside a namespace sandbox, running as the sandbox's root (the worst case), must not get out.

Each test runs a real attempt inside a real sandbox and asserts the outcome the attacker would need did not
happen: no host processes or files visible, no write to the shared ``/usr``, no route to the host's loopback,
no raw sockets, mounts, new user namespaces, modules or ptrace, no way past the resource limits, no view
into another sandbox, and a uid that is an unprivileged stranger on the host.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import anyio
import pytest

from corral.errors import CorralError
from corral.runtimes._cgroups import SandboxCgroup
from corral.runtimes.base import Limits

pytestmark = [pytest.mark.root, pytest.mark.bwrap, pytest.mark.anyio]

# Python snippets run inside the sandbox with the host's /usr/bin/python3 (the base template shows host /usr).
_SYSCALLS = r"""
import ctypes, errno, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def attempt(name, nr, *args):
    ret = libc.syscall(nr, *[ctypes.c_long(a) for a in args])
    err = ctypes.get_errno()
    print(name, "OK" if ret >= 0 else errno.errorcode.get(err, err), flush=True)
    if ret == 0 and name.startswith("clone"):
        os._exit(0)  # the child of a clone that worked
CLONE_NEWUSER, CLONE_NEWNS, CLONE_NEWNET, SIGCHLD = 0x10000000, 0x00020000, 0x40000000, 17
attempt("unshare_user", 272, CLONE_NEWUSER)
attempt("unshare_mnt", 272, CLONE_NEWNS)
attempt("unshare_net", 272, CLONE_NEWNET)
attempt("clone_newuser", 56, CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0)
attempt("clone3", 435, 0, 0)
attempt("mount", 165, 0, 0, 0, 0, 0)
attempt("init_module", 175, 0, 0, 0)
attempt("finit_module", 313, 0, 0, 0)
attempt("delete_module", 176, 0, 0)
attempt("kexec_load", 246, 0, 0, 0, 0)
attempt("ptrace_attach", 101, 16, int(sys.argv[1]), 0, 0)
attempt("process_vm_readv", 310, int(sys.argv[1]), 0, 0, 0, 0, 0)
attempt("bpf", 321, 0, 0, 0)
attempt("perf_event_open", 298, 0, 0, -1, -1, 0)
attempt("keyctl", 250, 0, 0, 0, 0, 0)
attempt("userfaultfd", 323, 0)
attempt("io_uring_setup", 425, 1, 0)
attempt("open_by_handle_at", 304, -100, 0, 0)
attempt("reboot", 169, 0, 0, 0, 0)
attempt("setns", 308, 0, 0)
"""

_SOCKETS = r"""
import socket
for name, args in [("packet", (socket.AF_PACKET, socket.SOCK_RAW, 0)),
                   ("raw_icmp", (socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)),
                   ("raw_icmp6", (socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)),
                   ("raw_nonblock", (socket.AF_INET, socket.SOCK_RAW | socket.SOCK_NONBLOCK, 255))]:
    try:
        socket.socket(*args).close()
        print(name, "OK")
    except OSError as e:
        print(name, type(e).__name__)
"""


def _read(path: str) -> str:
    return Path(path).read_text()


def _exists(path: str) -> bool:
    return Path(path).exists()


def _mode(path: str) -> int:
    return Path(path).stat().st_mode & 0o777


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _results(text: str) -> dict[str, str]:
    return dict(line.split(None, 1) for line in text.splitlines() if line.strip())


async def test_host_processes_are_invisible(ns_sandbox) -> None:
    sb = await ns_sandbox()
    result = await sb.run("for p in /proc/[0-9]*; do basename $p; done")
    pids = {int(p) for p in result.out.split()}
    assert pids and max(pids) < 100, pids  # a fresh pid namespace: bwrap's init, the agent, this shell
    ps = (await sb.run(["ps", "-eo", "args"])).out
    assert "_shim.py" not in ps and "pytest" not in ps and "systemd" not in ps
    assert (await sb.run(f"cat /proc/{os.getpid()}/cmdline")).exit_code != 0 or os.getpid() < 100


async def test_host_files_are_invisible(ns_sandbox, corral_data_dir: Path, tmp_path: Path) -> None:
    secret = tmp_path / "host-secret.txt"
    secret.write_text("top secret")
    sb = await ns_sandbox()
    for path in (
        str(secret),
        str(corral_data_dir),
        "/work",
        "/etc/machine-id",
        "/etc/ssh",
        "/root/.bashrc",
        "/var/lib/dpkg",
        "/home/user/.ssh",
        "/sys/kernel",
        "/dev/vda",
        "/dev/kvm",
        "/dev/mem",
    ):
        assert (await sb.run(["test", "-e", path])).exit_code == 1, f"{path} is visible in the sandbox"
    assert (await sb.run("ls -A /root")).out == ""
    shadow = (await sb.run("cat /etc/shadow")).out
    assert shadow.startswith("root:*:")  # the template's, with no password hash
    assert shadow != _read("/etc/shadow")
    assert (await sb.run(f"ls {sb.state_dir}")).exit_code != 0  # nor its own host-side state


async def test_shared_usr_and_bundle_are_read_only(ns_sandbox) -> None:
    sb = await ns_sandbox()
    for target in ("/usr/bin/corral-evil", "/usr/lib/corral-evil", "/.corral/evil", "/.corral/bin/python3"):
        result = await sb.run(f"echo x > {target}")
        assert result.exit_code != 0, target
        assert b"Read-only file system" in result.stderr or b"Permission denied" in result.stderr
    assert (await sb.run("rm -f /usr/bin/env; chmod 777 /usr/bin; test -x /usr/bin/env")).exit_code == 0
    assert not _exists("/usr/bin/corral-evil")
    assert oct(_mode("/usr/bin")) == "0o755"


async def test_no_route_to_the_hosts_loopback(ns_sandbox) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        server.setblocking(False)
        port = server.getsockname()[1]
        sb = await ns_sandbox()
        probe = (
            "import socket\n"
            f"for host in ('127.0.0.1', 'localhost', '10.0.2.2', '8.8.8.8'):\n"
            "    try:\n"
            f"        socket.create_connection((host, {port}), timeout=2).close(); print(host, 'OK')\n"
            "    except OSError as e:\n"
            "        print(host, type(e).__name__)\n"
        )
        answers = _results((await sb.run(["python3", "-c", probe])).out)
        assert answers["127.0.0.1"] == "ConnectionRefusedError"  # the sandbox's own loopback: nobody there
        assert answers["localhost"] == "ConnectionRefusedError"
        assert answers["10.0.2.2"] == "OSError" and answers["8.8.8.8"] == "OSError"  # network unreachable
        with pytest.raises(BlockingIOError):
            server.accept()  # nothing ever reached the host's listener
    links = (await sb.run("cat /proc/net/dev")).out
    assert [line.split(":")[0].strip() for line in links.splitlines()[2:]] == ["lo"]


async def test_no_raw_or_packet_sockets(ns_sandbox) -> None:
    sb = await ns_sandbox()
    answers = _results((await sb.run(["python3", "-c", _SOCKETS])).out)
    assert answers == {k: "PermissionError" for k in ("packet", "raw_icmp", "raw_icmp6", "raw_nonblock")}


async def test_dangerous_syscalls_are_refused(ns_sandbox) -> None:
    sb = await ns_sandbox()
    await sb.run(["sleep", "300"], background=True)  # a ptrace target: another process in the sandbox
    target = (await sb.run("pgrep -x sleep")).out.split()[0]
    answers = _results((await sb.run(["python3", "-c", _SYSCALLS, target])).out)
    assert answers.pop("clone3") == "ENOSYS"  # so glibc falls back to clone, whose flags are checked
    assert answers == dict.fromkeys(answers, "EPERM"), answers
    assert len(answers) == 19


async def test_mount_tools_fail(ns_sandbox) -> None:
    sb = await ns_sandbox()
    for cmd in (
        "mount -t tmpfs none /mnt",
        "mount --bind /usr /mnt",
        "umount /proc",
        "unshare -U -r true",
        "unshare -m true",
        "mknod /tmp/mem c 1 1",
        "chroot / true && nsenter -t 1 -m true",
        "echo c > /proc/sysrq-trigger",
        "echo 1 > /proc/sys/kernel/sysrq",
    ):
        assert (await sb.run(cmd)).exit_code != 0, cmd
    assert (await sb.run("test -e /tmp/mem")).exit_code == 1


async def test_capabilities_and_no_new_privs(ns_sandbox) -> None:
    sb = await ns_sandbox()
    status = _results(
        (await sb.run("grep -E '^(CapEff|CapPrm|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status")).out
    )
    cap_eff = int(status["CapEff:"], 16)
    assert int(status["CapBnd:"], 16) == cap_eff  # nothing outside the kept set can ever come back
    for bit, name in (
        (21, "SYS_ADMIN"),
        (13, "NET_RAW"),
        (27, "MKNOD"),
        (19, "SYS_PTRACE"),
        (16, "SYS_MODULE"),
        (12, "NET_ADMIN"),
        (17, "SYS_RAWIO"),
        (25, "SYS_TIME"),
    ):
        assert not cap_eff & (1 << bit), f"CAP_{name} is effective in the sandbox"
    assert cap_eff & (1 << 7)  # CAP_SETUID is kept: root inside may become another sandbox user
    assert status["NoNewPrivs:"] == "1" and status["Seccomp:"] == "2"
    # a uid-0 exec cannot regain what bwrap dropped (no_new_privs caps the permitted set)
    again = _results((await sb.run(["sh", "-c", "grep CapPrm /proc/self/status"])).out)
    assert int(again["CapPrm:"], 16) == int(status["CapPrm:"], 16)


async def test_files_are_owned_by_an_unprivileged_host_range(ns_sandbox) -> None:
    sb = await ns_sandbox()
    assert (await sb.run("touch /tmp/by-root")).exit_code == 0
    assert (await sb.run("touch /tmp/by-user", user="user")).exit_code == 0
    base = sb.instance.extra["uid_base"]
    assert base >= 100_000
    root_file, user_file = (sb.upper / "tmp" / "by-root").stat(), (sb.upper / "tmp" / "by-user").stat()
    assert (root_file.st_uid, root_file.st_gid) == (base, base)
    assert (user_file.st_uid, user_file.st_gid) == (base + 1000, base + 1000)
    uid_map = (await sb.run("cat /proc/self/uid_map")).out.split()
    assert uid_map == ["0", str(base), "65536"]


async def test_sandboxes_cannot_see_each_other(ns_sandbox) -> None:
    a, b = await ns_sandbox(), await ns_sandbox()
    assert a.instance.extra["uid_base"] != b.instance.extra["uid_base"]
    await a.run("echo secret > /tmp/a-secret")
    await a.run(["sleep", "300"], background=True)
    listen = (
        "import socket, sys\ns = socket.socket(socket.AF_UNIX)\ns.bind('\\0corral-escape-test')\ns.listen()\n"
        "print('listening', flush=True)\ns.accept()\n"
    )
    async with a.client.request("exec", {"argv": ["python3", "-c", listen], "user": "root"}) as req:
        async for frame in req:
            if frame.get("ev") == "stdout":
                break  # A is listening on an abstract socket (scoped to A's network namespace)
        dial = "import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect('\\0corral-escape-test')\n"
        assert (await b.run(["python3", "-c", dial])).exit_code != 0
    assert (await b.run("test -e /tmp/a-secret")).exit_code == 1
    assert (await b.run("pgrep -x sleep")).exit_code == 1
    assert (await b.run(f"ls {a.upper}")).exit_code != 0


async def test_limits_hold_and_the_host_stays_responsive(ns_sandbox) -> None:
    sb = await ns_sandbox(limits=Limits(memory_mb=128, pids=64))
    cgroup = SandboxCgroup.from_json(dict(sb.instance.extra["cgroup"]))
    # forks until pids.max stops it, holds every pid until told to stop on stdin, then reaps its children
    # itself, so the pids are free again when its exit event arrives
    fork_bomb = (
        "import os, signal, sys, time\n"
        "kids = []\n"
        "while True:\n"
        "    try:\n"
        "        pid = os.fork()\n"
        "    except BlockingIOError:\n"
        "        break\n"
        "    if pid == 0:\n"
        "        bytearray(1024 * 1024); time.sleep(300); os._exit(0)\n"
        "    kids.append(pid)\n"
        "print('saturated', len(kids), flush=True)\n"
        "sys.stdin.read()\n"
        "for pid in kids: os.kill(pid, signal.SIGKILL)\n"
        "for pid in kids: os.waitpid(pid, 0)\n"
    )
    request = {"argv": ["python3", "-c", fork_bomb], "user": "root", "stdin": True}
    async with sb.client.request("exec", request) as req:
        frames = aiter(req)
        started = await anext(frames)
        assert started.get("ev") == "started"
        saturated = await anext(frames)
        assert saturated.payload.startswith(b"saturated")  # the bomb hit pids.max
        current = int((cgroup.dirs["pids"] / "pids.current").read_text())
        assert current <= 64
        with pytest.raises(CorralError):  # the sandbox has no pid left to start anything with
            await sb.run(["true"])
        with anyio.fail_after(10):  # the host is still responsive
            done = await anyio.run_process(["true"])
        assert done.returncode == 0
        await sb.client.call("stdin", {"process_id": started.get("process_id"), "eof": True})
        async for frame in frames:
            if frame.get("ev") == "exit":
                assert frame.get("exit_code") == 0
    assert (await sb.run(["echo", "ok"])).stdout == b"ok\n"
    memory = await sb.run(["python3", "-c", "x = bytearray(512 * 1024 * 1024)"])
    assert memory.signal == 9 or memory.exit_code in (137, -9)  # OOM-killed at 128 MiB
    usage = int((cgroup.dirs["memory"] / "memory.max_usage_in_bytes").read_text())
    assert usage <= 128 * 1024 * 1024
    with anyio.fail_after(10):
        assert (await anyio.run_process(["true"])).returncode == 0


async def test_other_host_users_cannot_read_a_sandbox(ns_sandbox) -> None:
    sb = await ns_sandbox(env={"API_KEY": "s3cret"})
    await sb.run("echo private > /tmp/mine && chmod 644 /tmp/mine")
    # the state dir is closed to others whatever its parents allow (the test data dir is 0700 already)
    assert _mode(str(sb.state_dir)) == 0o700 and _mode(str(sb.state_dir / "shim.json")) == 0o600
    for path in (sb.upper / "tmp" / "mine", sb.state_dir / "shim.json", sb.state_dir / "shim.log"):
        done = await anyio.run_process(["cat", str(path)], user=65534, group=65534, check=False)
        assert done.returncode != 0 and b"Permission denied" in done.stderr, path


async def test_loopback_works_inside(ns_sandbox) -> None:
    sb = await ns_sandbox()
    serve_and_dial = (
        "import socket\n"
        "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n"
        "c = socket.create_connection(s.getsockname()); a, _ = s.accept()\n"
        "c.sendall(b'ping'); print(a.recv(4).decode())\n"
    )
    assert (await sb.run(["python3", "-c", serve_and_dial])).out == "ping\n"


async def test_kill_all_reaches_only_the_sandbox(ns_sandbox) -> None:
    async with await anyio.open_process(["sleep", "300"]) as host_sleep:
        try:
            sb = await ns_sandbox()
            # kill(-1): every process the caller may signal; inside, that is the sandbox, agent included
            with pytest.raises(CorralError):  # the agent dies with the rest of the sandbox
                await sb.run(["kill", "-9", "-1"], timeout=10)
            assert _running(host_sleep.pid)  # the host's processes were out of reach
        finally:
            host_sleep.kill()


async def test_host_abstract_sockets_are_out_of_reach(ns_sandbox) -> None:
    with socket.socket(socket.AF_UNIX) as server:
        server.bind("\0corral-host-escape-test")
        server.listen()
        server.setblocking(False)
        sb = await ns_sandbox()
        dial = "import socket\nsocket.socket(socket.AF_UNIX).connect('\\0corral-host-escape-test')\n"
        result = await sb.run(["python3", "-c", dial])
        assert result.exit_code != 0 and b"ConnectionRefusedError" in result.stderr
        with pytest.raises(BlockingIOError):
            server.accept()
