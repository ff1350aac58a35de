"""The sandbox's sudo: its option parsing (corral.agent.sudo_client) and the environment it gives a command
(corral.agent.sudo.sanitized_env). Running it for real: tests/runtimes/test_sudo_runtimes.py, tests/e2b."""

from __future__ import annotations

import pytest

from corral.agent.sudo import SECURE_PATH, sanitized_env
from corral.agent.sudo_client import Usage, main, parse
from corral.agent.users import Identity


@pytest.mark.parametrize(
    ("args", "user", "mode", "preserve", "argv"),
    [
        (["whoami"], None, "command", False, ["whoami"]),
        (["-n", "apt-get", "-y", "install", "x"], None, "command", False, ["apt-get", "-y", "install", "x"]),
        (["-u", "user", "id"], "user", "command", False, ["id"]),
        (["-uuser", "id"], "user", "command", False, ["id"]),
        (["--user=user", "id"], "user", "command", False, ["id"]),
        (["-nE", "env"], None, "command", True, ["env"]),
        (["--preserve-env=A,B", "env"], None, "command", ["A", "B"], ["env"]),
        (["-i"], None, "login", False, []),
        (["-s", "echo", "hi"], None, "shell", False, ["echo", "hi"]),
        (["--", "-weird", "-n"], None, "command", False, ["-weird", "-n"]),
        (["-k", "ls", "-la"], None, "command", False, ["ls", "-la"]),  # options after the command are its own
    ],
)
def test_parse(args: list[str], user: str | None, mode: str, preserve: object, argv: list[str]) -> None:
    opts = parse(args)
    assert (opts["user"], opts["mode"], opts["preserve"], opts["argv"]) == (user, mode, preserve, argv)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-x", "ls"], "sudo: invalid option -- 'x'"),
        (["--bogus"], "sudo: unrecognized option '--bogus'"),
        (["-u"], "sudo: option requires an argument -- 'u'"),
        (["-g", "wheel", "ls"], "sudo: option -g is not supported in this sandbox"),
    ],
)
def test_bad_options_are_refused_in_sudos_words(args: list[str], message: str) -> None:
    with pytest.raises(Usage, match=message):
        parse(args)


def test_no_ops_and_usage(capsys: pytest.CaptureFixture[str]) -> None:
    for args in (["-v"], ["-k"], ["-K"], ["-nv"]):
        assert main(args) == 0  # nothing to validate or forget: no password
    assert main([]) == 1 and capsys.readouterr().err.startswith("usage: sudo -h")
    assert main(["-x"]) == 1 and capsys.readouterr().err.startswith("sudo: invalid option -- 'x'\nusage:")
    assert main(["-V"]) == 0 and "Sudo version" in capsys.readouterr().out


ROOT = Identity(name="root", login="root", uid=0, gid=0, home="/root", shell="/bin/bash", switch=False)
CALLER = {"PATH": "/home/user/bin:/usr/bin", "HOME": "/home/user", "TERM": "xterm", "LC_ALL": "C", "FOO": "1"}


def test_the_environment_is_reset_like_debians_sudo() -> None:
    env = sanitized_env(CALLER, ROOT, preserve=False, sudo_user="user", uid=1000, gid=1000, command="id -u")
    assert env == {
        "TERM": "xterm",
        "LC_ALL": "C",
        "HOME": "/root",
        "SHELL": "/bin/bash",
        "MAIL": "/var/mail/root",
        "USER": "root",
        "LOGNAME": "root",
        "PATH": SECURE_PATH,
        "SUDO_USER": "user",
        "SUDO_UID": "1000",
        "SUDO_GID": "1000",
        "SUDO_COMMAND": "id -u",
    }
    kept = sanitized_env(CALLER, ROOT, preserve=True, sudo_user="user", uid=1000, gid=1000, command="x")
    assert kept["FOO"] == "1" and kept["HOME"] == "/home/user" and kept["PATH"] == SECURE_PATH
    listed = sanitized_env(CALLER, ROOT, preserve=["FOO"], sudo_user="user", uid=1000, gid=1000, command="x")
    assert listed["FOO"] == "1" and listed["HOME"] == "/root"
