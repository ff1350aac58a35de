"""E2B's image contract through the real SDK: user ``user``, home and cwd ``/home/user``, ``bash -l``, umask
022, ``python3``, and passwordless ``sudo`` (served by the agent: :mod:`corral.agent.sudo`), in the templates
``base`` and ``code-interpreter-v1``; and what sudo must not give: another sandbox's agent, a forged caller,
the host's files."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Box, E2BServer, make_box
from e2b import CommandExitException
from e2b import Sandbox as E2BSandbox


@pytest.fixture(scope="module", params=["base", "code-interpreter-v1"])
def tbox(request: pytest.FixtureRequest, module_env: E2BServer) -> Iterator[Box]:
    yield from make_box(module_env, template=request.param)


def test_the_image_contract(tbox: Box) -> None:
    sbx = tbox.e2b()
    r = sbx.commands.run(
        "id -un; echo $HOME; pwd; umask; shopt -q login_shell && echo login; python3 -c 'print(3)'"
    )
    assert r.stdout == "user\n/home/user\n/home/user\n0022\nlogin\n3\n"
    r = sbx.commands.run(
        "sudo whoami; sudo -n true && echo n-ok; sudo -n id -u; sudo -v && sudo -k && echo v-k"
    )
    assert r.stdout == "root\nn-ok\n0\nv-k\n"
    assert sbx.commands.run("sudo -n apt-get --version").stdout.startswith("apt ")


def test_sudo_options(box: Box) -> None:
    sbx = box.e2b()
    assert (
        sbx.commands.run("sudo -u user id -un; sudo -u root id -un; sudo -- id -un").stdout
        == "user\nroot\nroot\n"
    )
    assert (
        sbx.commands.run("cd /tmp && sudo -i pwd && sudo -s pwd && sudo -i whoami").stdout
        == "/root\n/tmp\nroot\n"
    )
    # env_reset by default, kept with -E; SUDO_* always, secure_path always
    r = sbx.commands.run(
        "sudo printenv FOO HOME SUDO_USER; sudo -E printenv FOO SUDO_UID", envs={"FOO": "bar"}
    )
    assert r.stdout == "/root\nuser\nbar\n1000\n"
    assert sbx.commands.run("sudo --preserve-env=FOO printenv FOO", envs={"FOO": "b"}).stdout == "b\n"
    for bad, message in (("-x true", "sudo: invalid option -- 'x'"), ("-g x true", "-g is not supported")):
        with pytest.raises(CommandExitException) as info:
            sbx.commands.run(f"sudo {bad}")
        assert (
            info.value.exit_code == 1 and message in info.value.stderr and "usage: sudo" in info.value.stderr
        )
    with pytest.raises(CommandExitException) as info:
        sbx.commands.run("sudo -u nobody-here true")
    assert info.value.stderr == "sudo: unknown user nobody-here\n"
    with pytest.raises(CommandExitException) as info:
        sbx.commands.run("sudo no-such-command")
    assert info.value.exit_code == 1 and info.value.stderr == "sudo: no-such-command: command not found\n"


def test_root_owned_files_exit_codes_and_stdin(box: Box) -> None:
    sbx = box.e2b()
    sbx.commands.run("sudo sh -c 'umask 077; echo secret > /etc/corral-sudo-test'")
    r = sbx.commands.run("stat -c '%U %a' /etc/corral-sudo-test; cat /etc/corral-sudo-test || echo denied")
    assert r.stdout == "root 600\ndenied\n"
    assert sbx.commands.run("sudo cat /etc/corral-sudo-test").stdout == "secret\n"
    with pytest.raises(CommandExitException) as info:
        sbx.commands.run("sudo sh -c 'echo out; echo err >&2; exit 7'")
    assert (info.value.exit_code, info.value.stdout, info.value.stderr) == (7, "out\n", "err\n")
    # killed by a signal: sudo dies of the same signal, as the shell sees
    assert sbx.commands.run("sudo sh -c 'kill -TERM $$'; echo $?").stdout == f"{128 + 15}\n"
    assert sbx.commands.run("printf 'a\\nb\\n' | sudo tac").stdout == "b\na\n"
    handle = sbx.commands.run("sudo cat; echo done", background=True, stdin=True)
    sbx.commands.send_stdin(handle.pid, "through sudo\n")
    sbx.commands.close_stdin(handle.pid)
    assert handle.wait().stdout == "through sudo\ndone\n"


def _root_sleepers(sbx: E2BSandbox, tag: str) -> str:
    return sbx.commands.run(f"pgrep -u 0 -f 'sleep {tag}' || true").stdout


def test_killing_sudo_kills_the_root_command(box: Box) -> None:
    sbx = box.e2b()
    for tag in ("1001", "1002"):
        handle = sbx.commands.run(f"sudo sleep {tag}", background=True)
        deadline = time.monotonic() + 10
        while not _root_sleepers(sbx, tag) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _root_sleepers(sbx, tag), "the root command never started"
        if tag == "1001":
            assert sbx.commands.kill(handle.pid)  # SIGKILL of the command's group: sudo cannot forward it
        else:
            sbx.commands.run(
                f"pkill -TERM -u user -f '[s]udo_client sleep {tag}'"
            )  # caught by sudo and forwarded
        deadline = time.monotonic() + 10
        while _root_sleepers(sbx, tag) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _root_sleepers(sbx, tag), f"root's sleep {tag} outlived its sudo"
        with contextlib.suppress(CommandExitException):
            handle.wait()


FORGE = r"""
import array, json, os, socket, struct, sys
def ask(claim_creds):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect("/run/corral/sudo.sock")
    req = json.dumps({"argv": ["id", "-u"], "cwd": "/", "env": {}, "uid": 0, "user": "root"}).encode()
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [0, 1, 2]))]
    if claim_creds:
        anc.append((socket.SOL_SOCKET, socket.SCM_CREDENTIALS, struct.pack("3i", os.getpid(), 0, 0)))
    try:
        s.sendmsg([req], anc)
    except OSError as exc:
        return f"refused:{exc.errno}"
    return json.loads(s.recv(4096)).get("error", "ran")
os.setresgid(4321, 4321, 4321); os.setgroups([]); os.setresuid(4321, 4321, 4321)
print(ask(True)); print(ask(False))
"""


def test_a_forged_caller_is_refused(box: Box) -> None:
    """The caller is who the kernel says sent the request: a uid that may not sudo cannot claim root in
    ``SCM_CREDENTIALS`` (EPERM) nor in the request, and is refused as itself."""
    sbx = box.e2b()
    sbx.files.write("/tmp/forge.py", FORGE)
    r = sbx.commands.run("python3 /tmp/forge.py", user="root")
    assert r.stdout == "refused:1\nuid 4321 is not in the sudoers file.\n"
    r = sbx.commands.run(
        'python3 -c \'import os; os.setuid(4321); os.execvp("sudo", ["sudo", "id"])\' || echo rc=$?',
        user="root",
    )
    assert r.stdout == "rc=1\n" and "not in the sudoers file" in r.stderr


def test_sudo_reaches_only_its_own_sandbox_and_never_the_host(box: Box, module_env: E2BServer) -> None:
    sbx = box.e2b()
    marker = f"/root/only-in-{box.sandbox_id}"
    sbx.commands.run(f"sudo touch {marker}")
    host_file = Path(module_env.data_dir)  # exists on the host, never inside a sandbox
    other = E2BSandbox.create(timeout=120)
    try:
        r = other.commands.run(
            f"sudo test -e {marker} && echo seen || echo absent; sudo touch /root/from-other"
        )
        assert r.stdout == "absent\n"  # its sudo is its own agent's
        assert (
            sbx.commands.run("sudo test -e /root/from-other && echo seen || echo absent").stdout == "absent\n"
        )
        for path in (host_file, f"/proc/1/root{host_file}", f"/proc/1/cwd{host_file}"):
            r = sbx.commands.run(f"sudo test -e {path} && echo visible || echo absent")
            assert r.stdout == "absent\n", path
    finally:
        other.kill()
