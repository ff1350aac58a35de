"""``python3 -I -S -B -m corral.agent [--listen unix:PATH|tcp:HOST:PORT|vsock:PORT [--secret-file PATH]]
[--memory-limit BYTES [--memory-available]] [--oom-events-fd FD]
[--memory-usage-fd FD --memory-stat-fd FD] [--sudo]``

Stdio (the default): the protocol runs over stdin/stdout and the agent exits, killing its processes, when stdin
reaches EOF. The agent moves the protocol to private fds and points fds 0 and 1 at /dev/null and stderr, so no
stray ``print`` can corrupt the stream and no child inherits it. The ``hello`` is sent first, before the rest of
the agent is even imported: the runtime's ``create`` waits for it.

Listen: serve any number of connections, concurrently, each with its own ``hello``; processes outlive
connections (foreground ones are killed with the connection that started them). A unix socket is created mode
0600, so only root in the sandbox can connect. TCP and vsock listeners need ``--secret-file``: every peer must
prove it holds that secret before its ``hello`` (:mod:`corral.protocol.auth`). The secret is read once and its
file removed (where the mount allows); it never travels in argv or the environment.

``--sudo`` (given by the runtimes, inside a sandbox only: never on a host) serves the sandbox's passwordless
``sudo`` when the agent is root (:mod:`corral.agent.sudo`).
"""

from __future__ import annotations

import os
import sys

from corral.agent.hello import hello_fields
from corral.protocol.frames import encode

USAGE = (
    "usage: python -m corral.agent [--listen unix:PATH|tcp:HOST:PORT|vsock:PORT [--secret-file PATH]] "
    "[--memory-limit BYTES [--memory-available]] [--oom-events-fd FD] [--memory-usage-fd FD --memory-stat-fd FD] [--sudo]"
)


def _stdio_fds() -> tuple[int, int]:
    rfd = os.dup(0)
    wfd = os.dup(1)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)
    return rfd, wfd


def main(argv: list[str]) -> int:
    listen = None
    memory_limit: int | None = None
    oom_events_fd: int | None = None
    usage_fds: dict[str, int] = {}
    secret_file = None
    sudo = False
    memory_available = False
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--listen" and args:
            listen = args.pop(0)
        elif arg == "--memory-limit" and args and args[0].isdigit():
            memory_limit = int(args.pop(0))
        elif arg == "--memory-available":
            memory_available = True
        elif arg == "--oom-events-fd" and args and args[0].isdigit():
            oom_events_fd = int(args.pop(0))
        elif arg in ("--memory-usage-fd", "--memory-stat-fd") and args and args[0].isdigit():
            usage_fds[arg] = int(args.pop(0))
        elif arg.startswith("--listen="):
            listen = arg.split("=", 1)[1]
        elif arg == "--sudo":
            sudo = True
        elif arg == "--secret-file" and args:
            secret_file = args.pop(0)
        elif arg in ("-h", "--help"):
            print(USAGE)
            return 0
        else:
            print(USAGE, file=sys.stderr)
            return 2
    os.umask(0o022)
    if secret_file is not None and listen is None:
        print("--secret-file goes with --listen", file=sys.stderr)
        return 2
    if listen is None:
        rfd, wfd = _stdio_fds()
        hello = encode({"ev": "hello", **hello_fields()})
        try:
            os.write(wfd, hello)
        except OSError:
            return 1
        from corral.agent.memory import configure  # the sandbox's own OOM killer: see there

        configure(memory_limit, oom_events_fd, available=memory_available)
        from corral.agent import usage

        usage.configure(usage_fds.get("--memory-usage-fd"), usage_fds.get("--memory-stat-fd"))
        from corral.agent._serve import serve_stdio

        return serve_stdio(rfd, wfd, sudo=sudo)
    from corral.agent.memory import configure

    configure(memory_limit, oom_events_fd, available=memory_available)
    from corral.agent import usage

    usage.configure(usage_fds.get("--memory-usage-fd"), usage_fds.get("--memory-stat-fd"))
    from corral.agent._serve import serve_listen

    keyring = None
    if secret_file is not None:
        from corral.agent.auth import load_secret

        keyring = load_secret(secret_file)
    return serve_listen(listen, keyring, sudo=sudo)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
