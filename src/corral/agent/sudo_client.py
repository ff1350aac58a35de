"""``sudo`` inside a Corral sandbox: asks the agent (:mod:`corral.agent.sudo`) to run a command as root.

Run by the bundle's interpreter (``/.corral/sbin/sudo``). It parses sudo's options, passes its own stdin,
stdout and stderr to the agent, forwards the signals it catches to the command and exits as the command did
(killed by a signal: it kills itself with that signal, as sudo does). Passwords never come into it: every
caller the agent accepts is ``NOPASSWD``, so ``-n``, ``-S``, ``-v``, ``-k`` and ``-K`` change nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import sys

SOCKET_PATH = "/run/corral/sudo.sock"  # corral.agent.sudo.SOCKET_PATH (this module imports nothing of Corral)
VERSION = "Sudo version 1.9.13p3 (Corral: the agent runs the command)"
USAGE = """usage: sudo -h | -K | -k | -V
usage: sudo -v [-knS] [-u user]
usage: sudo -l [-knS] [-U user] [-u user] [command [arg ...]]
usage: sudo [-EHknS] [-u user] [-i | -s] [--] [command [arg ...]]
"""
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
UNSUPPORTED = set("ABbCDghPpRrTU")  # sudo options this sandbox's sudo does not offer


class Usage(Exception):
    """Bad options: ``message`` (may be empty) then the usage, exit 1."""


def parse(args: list[str]) -> dict[str, object]:
    opts: dict[str, object] = {"user": None, "mode": "command", "preserve": False, "action": None}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            i += 1
            break
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            if name == "user":
                if not eq:
                    i += 1
                    if i >= len(args):
                        raise Usage("sudo: option '--user' requires an argument")
                    value = args[i]
                opts["user"] = value
            elif name == "preserve-env":
                opts["preserve"] = value.split(",") if eq else True
            elif name in ("login", "shell"):
                opts["mode"] = name
            elif name == "reset-timestamp":
                opts["reset"] = True
            elif name in ("non-interactive", "set-home", "stdin"):
                pass
            elif name in ("validate", "remove-timestamp", "version", "help", "list"):
                opts["action"] = name
            else:
                raise Usage(f"sudo: unrecognized option '{arg}'")
            i += 1
            continue
        if not arg.startswith("-") or arg == "-":
            break
        j = 1
        while j < len(arg):
            c = arg[j]
            if c == "u":
                value = arg[j + 1 :]
                if not value:
                    i += 1
                    if i >= len(args):
                        raise Usage("sudo: option requires an argument -- 'u'")
                    value = args[i]
                opts["user"] = value
                break
            if c == "E":
                opts["preserve"] = True
            elif c == "i":
                opts["mode"] = "login"
            elif c == "s":
                opts["mode"] = "shell"
            elif c == "k":
                opts["reset"] = True  # alone: done; with a command: runs it
            elif c in "nHS":
                pass
            elif c in "vKVhl":
                opts["action"] = {"v": "validate", "K": "remove-timestamp", "V": "version", "h": "help"}.get(
                    c, "list"
                )
            elif c in UNSUPPORTED:
                raise Usage(f"sudo: option -{c} is not supported in this sandbox")
            else:
                raise Usage(f"sudo: invalid option -- '{c}'")
            j += 1
        i += 1
    opts["argv"] = args[i:]
    return opts


def main(args: list[str]) -> int:
    try:
        opts = parse(args)
    except Usage as exc:
        sys.stderr.write(f"{exc}\n{USAGE}" if str(exc) else USAGE)
        return 1
    argv = opts["argv"]
    assert isinstance(argv, list)
    action = opts["action"]
    if action == "help":
        sys.stdout.write(USAGE)
        return 0
    if action == "version":
        print(VERSION)
        return 0
    if action in ("validate", "remove-timestamp"):
        return 0  # no password, so no timestamp to refresh or remove
    if action == "list" and not argv:
        print("User may run the following commands on this sandbox:\n    (ALL : ALL) NOPASSWD: ALL")
        return 0
    if not argv and opts["mode"] == "command":
        if opts.get("reset"):
            return 0
        sys.stderr.write(USAGE)
        return 1
    if action == "list":
        print(argv[0])
        return 0
    try:
        cwd = os.getcwd()
    except OSError:
        cwd = "/"
    request = {
        "argv": argv,
        "cwd": cwd,
        "env": dict(os.environ),
        "user": opts["user"],
        "mode": opts["mode"],
        "preserve": opts["preserve"],
    }
    return run(json.dumps(request).encode())


def run(request: bytes) -> int:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sock.connect(SOCKET_PATH)
        socket.send_fds(sock, [request], [0, 1, 2])
    except OSError as exc:
        sys.stderr.write(f"sudo: cannot reach the sandbox agent ({exc.strerror})\n")
        return 1
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    for forwarded in FORWARDED:
        signal.signal(forwarded, lambda *_: None)
    sfd = sock.fileno()
    while True:
        try:
            ready, _, _ = select.select([sfd, wake_r], [], [])
        except InterruptedError:
            continue
        if wake_r in ready:
            for caught in os.read(wake_r, 64):
                with contextlib.suppress(OSError):
                    sock.send(json.dumps({"signal": caught}).encode())
        if sfd in ready:
            data = sock.recv(65536)
            if not data:
                sys.stderr.write("sudo: the sandbox agent went away\n")
                return 1
            msg = json.loads(data)
            if "error" in msg:
                sys.stderr.write(f"sudo: {msg['error']}\n")
                return int(msg.get("status", 1))
            if "exit" in msg:
                return int(msg["exit"])
            if "signal" in msg:
                signum = int(msg["signal"])
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
                return 128 + signum


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
