"""Passwordless ``sudo`` inside the sandbox, served by the agent (E2B's image contract: ``user`` may sudo).

Why not the image's own sudo. A setuid binary cannot raise privileges in Corral's sandboxes: the namespace
runtime runs every process with ``no_new_privs`` and mounts everything ``nosuid`` (bubblewrap), and the
sandbox's root is only root of its user namespace (gVisor) or guest (microVM) anyway. The agent, though, is
that root already, and runs commands as ``root`` whenever a client asks (``user="root"``). So ``sudo`` is a
small client of the agent (:mod:`corral.agent.sudo_client`, installed as ``/usr/local/bin/sudo``), and the
agent starts the command, exactly as for a ``root`` exec request: nothing is given to the sandbox that its
root did not have.

Wire: a ``SOCK_SEQPACKET`` unix socket at :data:`SOCKET_PATH` (mode 0666 in a root-owned 0755 directory, so
no other uid can replace it), one JSON message per datagram.
  client → agent  ``{"argv", "cwd", "env", "user", "mode", "preserve"}`` with fds [stdin, stdout, stderr];
  agent → client  ``{"started": pid}``, then ``{"exit": code}`` or ``{"signal": n}``; or ``{"error", "status"}``;
  client → agent  ``{"signal": n}``: a signal the client caught, for the command's process group.
The caller is who the kernel says sent the request (``SO_PASSCRED``: the kernel attaches the sender's
credentials to the datagram, and refuses ``SCM_CREDENTIALS`` a sender has no right to claim), never what the
request says: root and ``user`` may sudo, any other uid is refused. Not ``SO_PEERCRED``: gVisor answers it
with the credentials of the task asking (the agent, root), not the peer's. The command gets its own session and process group; when the
client goes away (killed, even by SIGKILL) the agent kills that group, so killing ``sudo`` kills the command.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
from typing import Any

from corral.agent.loop import Loop, log
from corral.agent.process import ProcessTable
from corral.agent.users import Identities, Identity

__all__ = ["CLIENT_DIR", "CLIENT_PATH", "SOCKET_PATH", "SudoService", "sanitized_env"]

SOCKET_DIR = "/run/corral"
SOCKET_PATH = SOCKET_DIR + "/sudo.sock"
INSTALL_PATH = "/usr/local/bin/sudo"
CLIENT_DIR = "/.corral/sbin"  # in the agent bundle (corral.runtimes._bundle), holding only ``sudo``
CLIENT_PATH = CLIENT_DIR + "/sudo"
SECURE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MESSAGE_SIZE = 1024 * 1024
MAX_CLIENTS = 256
KEPT_VARS = ("TERM", "COLORTERM", "DISPLAY", "LANG", "LANGUAGE", "TZ", "LS_COLORS", "XAUTHORITY")
CREDS = struct.Struct("3i")  # struct ucred: pid, uid, gid


def sanitized_env(
    caller: dict[str, str],
    target: Identity,
    *,
    preserve: bool | list[str],
    sudo_user: str,
    uid: int,
    gid: int,
    command: str,
) -> dict[str, str]:
    """The command's environment, as Debian's sudo makes it (``env_reset``, ``secure_path``); ``preserve``
    (``-E``) keeps the caller's, a list (``--preserve-env=A,B``) keeps those names too."""
    if preserve is True:
        env = dict(caller)
    else:
        keep = set(KEPT_VARS) | set(preserve or ())
        env = {k: v for k, v in caller.items() if k in keep or k.startswith("LC_")}
        env.update(HOME=target.home, SHELL=target.shell, MAIL=f"/var/mail/{target.login}")
    env.update(USER=target.login, LOGNAME=target.login, PATH=SECURE_PATH)
    env.update(SUDO_USER=sudo_user, SUDO_UID=str(uid), SUDO_GID=str(gid), SUDO_COMMAND=command[:4096])
    return env


class SudoService:
    """The agent's sudo listener. Made only when the agent is root (else there is nothing to grant)."""

    def __init__(self, loop: Loop, table: ProcessTable, identities: Identities) -> None:
        self.loop = loop
        self.table = table
        self.identities = identities
        self.clients: dict[int, _Client] = {}
        self.sock = _listen()
        loop.add_reader(self.sock.fileno(), self._accept)
        self.on_path = True  # whether ``sudo`` is on the image's own PATH (else the agent adds CLIENT_DIR)

    @classmethod
    def start(cls, loop: Loop, table: ProcessTable, identities: Identities) -> SudoService | None:
        if os.geteuid() != 0:
            return None
        try:
            service = cls(loop, table, identities)
        except OSError as exc:
            log(f"no sudo in this sandbox: cannot listen on {SOCKET_PATH} ({exc.strerror})")
            return None
        service.on_path = _install_client()
        return service

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log(f"sudo: accept failed: {exc}")
                return
            if len(self.clients) >= MAX_CLIENTS:
                conn.close()
                continue
            conn.setblocking(False)
            client = _Client(self, conn)
            self.clients[conn.fileno()] = client
            self.loop.add_reader(conn.fileno(), client.on_readable)

    def caller(self, uid: int) -> Identity | None:
        """Who may sudo: root and ``user`` (E2B's ``user ALL=(ALL:ALL) NOPASSWD: ALL``)."""
        for identity in (self.identities.root, self.identities.user):
            if identity.uid == uid:
                return identity
        return None

    def target(self, name: str) -> Identity | None:
        for identity in (self.identities.root, self.identities.user):
            if name in (identity.name, identity.login, f"#{identity.uid}"):
                return identity
        return None

    def close(self) -> None:
        for client in list(self.clients.values()):
            client.close()
        self.loop.forget(self.sock.fileno())
        self.sock.close()


class _Client:
    def __init__(self, service: SudoService, conn: socket.socket) -> None:
        self.service = service
        self.conn = conn
        self.fd = conn.fileno()
        self.uid = self.gid = -1  # the kernel's word, from the request's SCM_CREDENTIALS
        self.pid: int | None = None  # the command, once started (its own process group)

    def on_readable(self) -> None:
        try:
            data, fds, creds = _recv(self.conn)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data, fds, creds = b"", [], None
        if creds is not None and self.pid is None:
            self.uid, self.gid = creds
        try:
            if not data:
                self.close()  # the client is gone: so is its command
                return
            try:
                msg = json.loads(data)
                if not isinstance(msg, dict):
                    raise ValueError
            except ValueError:
                self.fail("malformed request")
                return
            if self.pid is None:
                self.start(msg, fds)
            elif isinstance(msg.get("signal"), int) and 0 < msg["signal"] < 65:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.pid, msg["signal"])
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def start(self, msg: dict[str, Any], fds: list[int]) -> None:
        import shlex  # not at agent start: imports ``re``

        caller = self.service.caller(self.uid) if self.uid >= 0 else None
        if caller is None:
            self.fail(f"uid {self.uid} is not in the sudoers file.")
            return
        argv, cwd, env = msg.get("argv"), msg.get("cwd"), msg.get("env")
        mode, preserve = msg.get("mode", "command"), msg.get("preserve", False)
        if (
            len(fds) != 3
            or not isinstance(argv, list)
            or not all(isinstance(a, str) and "\x00" not in a for a in argv)
            or not isinstance(cwd, str)
            or not isinstance(env, dict)
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())
            or mode not in ("command", "login", "shell")
            or not isinstance(preserve, (bool, list))
            or (mode == "command" and not argv)
        ):
            self.fail("malformed request")
            return
        name = msg.get("user") or "root"
        target = self.service.target(name) if isinstance(name, str) else None
        if target is None:
            self.fail(f"unknown user {name}")
            return
        if mode == "login":
            cwd = target.home
            argv = [target.shell, "-l"] + (["-c", shlex.join(argv)] if argv else [])
        elif mode == "shell":
            shell = env.get("SHELL") or target.shell
            argv = [shell] + (["-c", shlex.join(argv)] if argv else [])
        env = sanitized_env(
            env,
            target,
            preserve=[p for p in preserve if isinstance(p, str)] if isinstance(preserve, list) else preserve,
            sudo_user=caller.login,
            uid=self.uid,
            gid=self.gid,
            command=shlex.join(argv),
        )
        kwargs: dict[str, Any] = {}
        if target.switch:
            kwargs = {"user": target.uid, "group": target.gid, "extra_groups": list(target.groups)}
        try:
            popen = subprocess.Popen(
                argv,
                stdin=fds[0],
                stdout=fds[1],
                stderr=fds[2],
                cwd=cwd or "/",
                env=env,
                start_new_session=True,
                close_fds=True,
                **kwargs,
            )
        except FileNotFoundError as exc:
            if exc.filename == cwd:
                self.fail(f"unable to change directory to {cwd}: {exc.strerror}")
            else:
                self.fail(f"{argv[0]}: command not found")
            return
        except OSError as exc:
            self.fail(f"unable to execute {argv[0]}: {exc.strerror}", status=126 if exc.errno == 13 else 1)
            return
        except (ValueError, subprocess.SubprocessError) as exc:
            self.fail(f"unable to execute {argv[0]}: {exc}")
            return
        popen.returncode = 0  # reaped by the agent (ProcessTable.reap), never by Popen
        self.pid = popen.pid
        self.service.table.other_children[popen.pid] = self.exited
        log(f"sudo: uid {self.uid} runs {argv[0]!r} as {target.login} (pid {popen.pid})")
        self.send({"started": popen.pid})

    def exited(self, status: int) -> None:
        self.pid = None
        if os.WIFSIGNALED(status):
            self.send({"signal": os.WTERMSIG(status)})
        else:
            self.send({"exit": os.waitstatus_to_exitcode(status)})
        self.close()

    def fail(self, message: str, status: int = 1) -> None:
        self.send({"error": message, "status": status})
        self.close()

    def send(self, msg: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(json.dumps(msg).encode())

    def close(self) -> None:
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
        if self.service.clients.pop(self.fd, None) is not None:
            self.service.loop.forget(self.fd)
            self.conn.close()


def _recv(conn: socket.socket) -> tuple[bytes, list[int], tuple[int, int] | None]:
    """One datagram, the fds it carries and the sender's (uid, gid) as the kernel attached them."""
    data, ancillary, _flags, _addr = conn.recvmsg(
        MESSAGE_SIZE, socket.CMSG_SPACE(CREDS.size) + socket.CMSG_SPACE(3 * 4)
    )
    fds: list[int] = []
    creds = None
    for level, kind, payload in ancillary:
        if level != socket.SOL_SOCKET:
            continue
        if kind == socket.SCM_RIGHTS:
            fds += array.array("i", payload[: len(payload) - len(payload) % 4]).tolist()
        elif kind == socket.SCM_CREDENTIALS and len(payload) >= CREDS.size:
            _pid, uid, gid = CREDS.unpack(payload[: CREDS.size])
            creds = (uid, gid)
    return data, fds, creds


def _listen() -> socket.socket:
    try:
        os.mkdir(SOCKET_DIR, 0o755)
    except FileExistsError:
        st = os.lstat(SOCKET_DIR)
        if (
            not os.path.isdir(SOCKET_DIR)
            or os.path.islink(SOCKET_DIR)
            or st.st_uid != 0
            or st.st_mode & 0o022
        ):
            raise PermissionError(1, "exists and is not root's own directory") from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)  # inherited by accepted sockets
    tmp = f"{SOCKET_PATH}.{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    try:
        sock.bind(tmp)
        os.chmod(tmp, 0o666)  # noqa: S103 - anyone may ask; SCM_CREDENTIALS decide
        sock.listen(16)
        os.rename(tmp, SOCKET_PATH)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def _install_client() -> bool:
    """Put ``sudo`` on every PATH: a link in /usr/local/bin (first in Debian's paths, login or not, so it also
    shadows an image's setuid sudo, which cannot work here). Where /usr is read-only, a profile script puts
    the bundle's directory first for login shells (E2B runs every command in ``bash -l``), and the agent for
    the processes it starts. True when the link is there."""
    if not os.path.exists(CLIENT_PATH):
        return True  # no client to install (a bundle without it): nothing to add to PATH either
    try:
        if os.path.lexists(INSTALL_PATH):
            if os.path.realpath(INSTALL_PATH) == CLIENT_PATH:
                return True
            os.rename(INSTALL_PATH, INSTALL_PATH + ".image")  # a setuid sudo: kept, out of the way
        os.makedirs(os.path.dirname(INSTALL_PATH), exist_ok=True)
        os.symlink(CLIENT_PATH, INSTALL_PATH)
        return True
    except OSError:
        pass
    script = f'case ":$PATH:" in *:{CLIENT_DIR}:*) ;; *) PATH="{CLIENT_DIR}:$PATH";; esac\n'
    try:
        os.makedirs("/etc/profile.d", exist_ok=True)
        with open("/etc/profile.d/00-corral-sudo.sh", "w", encoding="utf-8") as f:
            f.write(script)
    except OSError as exc:
        log(f"sudo: cannot put sudo on login shells' PATH ({exc.strerror})")
    return False
