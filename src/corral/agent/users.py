"""The two identities requests can run as: ``root`` and the unprivileged ``user`` (uid/gid 1000).

At start the agent makes sure ``user`` exists when it can: running as root with a writable ``/etc/passwd``
that has no ``user`` entry, it appends one (and a group, and creates the home directory). It reads the account
files directly instead of through ``pwd``/NSS, because the bundled interpreter must not depend on the image's
NSS configuration. An image that already has uid 1000 under another name (``node``, ``ubuntu``) keeps it: that
account is used as ``user`` rather than adding a second name for the same uid. When nothing can be written
(read-only root), ``user`` is still uid/gid 1000, with ``HOME=/tmp``. None of this may stop the agent.

When the agent is not root it cannot switch users; both identities then run as the agent's own uid.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

from corral.agent.loop import log

__all__ = ["Identities", "Identity", "ensure_user", "fork_helper"]

USER_NAME = "user"
USER_ID = 1000


class Identity:
    """Who a request runs as. (Plain class, not a dataclass: ``dataclasses`` costs ~8 ms of start-up.)"""

    __slots__ = ("gid", "groups", "home", "login", "name", "shell", "switch", "uid")

    def __init__(
        self,
        *,
        name: str,
        login: str,
        uid: int,
        gid: int,
        home: str,
        shell: str,
        groups: tuple[int, ...] = (),
        switch: bool = True,
    ) -> None:
        self.name = name  # "root" or "user", as in requests
        self.login = login  # the account name in /etc/passwd
        self.uid = uid
        self.gid = gid
        self.home = home
        self.shell = shell
        self.groups = groups
        self.switch = switch  # whether the agent must change uid/gid to act as this identity

    def env(self) -> dict[str, str]:
        return {"HOME": self.home, "USER": self.login, "LOGNAME": self.login}

    def __repr__(self) -> str:
        return f"Identity({self.name}: {self.login} {self.uid}:{self.gid} home={self.home})"


class Identities:
    __slots__ = ("root", "user")

    def __init__(self, *, root: Identity, user: Identity) -> None:
        self.root = root
        self.user = user

    def get(self, name: object) -> Identity | None:
        if name == "root":
            return self.root
        if name == "user":
            return self.user
        return None


def _read_db(path: str) -> list[list[str]]:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return [line.rstrip("\n").split(":") for line in f if line.strip() and not line.startswith("#")]
    except OSError:
        return []


def _supplementary(root: str, name: str, gid: int) -> tuple[int, ...]:
    groups = []
    for fields in _read_db(root + "etc/group"):
        if len(fields) >= 4 and name in fields[3].split(","):
            try:
                g = int(fields[2])
            except ValueError:
                continue
            if g != gid:
                groups.append(g)
    return tuple(groups)


def _find_user(root: str) -> tuple[str, int, int, str] | None:
    by_uid = None
    for fields in _read_db(root + "etc/passwd"):
        if len(fields) < 7:
            continue
        try:
            uid, gid = int(fields[2]), int(fields[3])
        except ValueError:
            continue
        if fields[0] == USER_NAME:
            return fields[0], uid, gid, fields[5] or "/tmp"
        if uid == USER_ID and by_uid is None:
            by_uid = (fields[0], uid, gid, fields[5] or "/tmp")
    return by_uid


def _create_user(root: str, shell: str) -> tuple[str, int, int, str] | None:
    home = f"/home/{USER_NAME}"
    try:
        if not os.access(root + "etc/passwd", os.W_OK):
            raise PermissionError(13, "not writable")
        groups = _read_db(root + "etc/group")
        if not any(len(f) >= 3 and (f[0] == USER_NAME or f[2] == str(USER_ID)) for f in groups):
            _append(root + "etc/group", f"{USER_NAME}:x:{USER_ID}:\n")
        _append(root + "etc/passwd", f"{USER_NAME}:x:{USER_ID}:{USER_ID}::{home}:{shell}\n")
        if os.access(root + "etc/shadow", os.W_OK):
            _append(root + "etc/shadow", f"{USER_NAME}:!:19000:0:99999:7:::\n")
    except OSError as exc:
        log(f"cannot add {USER_NAME!r} to the account files ({exc.strerror}); using uid {USER_ID}, HOME=/tmp")
        return None
    return USER_NAME, USER_ID, USER_ID, home


def _append(path: str, line: str) -> None:
    with open(path, "a+", encoding="utf-8") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() > 0:
            f.seek(f.tell() - 1)
            if f.read(1) != "\n":
                line = "\n" + line
        f.write(line)


def _ensure_home(root: str, home: str, uid: int, gid: int) -> str:
    try:
        if not os.path.isdir(root + home.lstrip("/")):
            os.makedirs(root + home.lstrip("/"), mode=0o755)
            os.chown(root + home.lstrip("/"), uid, gid)
        return home
    except OSError as exc:
        log(f"cannot create home directory {home} ({exc.strerror}); using HOME=/tmp")
        return "/tmp"


def ensure_user(root: str = "/") -> Identities:
    """Find or create ``user`` (under ``root``, which tests point elsewhere); return both identities.

    Never raises: a sandbox whose account files cannot be read or written still gets a working agent.
    """
    root = root.rstrip("/") + "/"
    shell = "/bin/bash" if os.path.exists(root + "bin/bash") else "/bin/sh"
    if os.geteuid() != 0:
        uid, gid = os.getuid(), os.getgid()
        home = os.environ.get("HOME") or "/tmp"
        login = os.environ.get("USER") or str(uid)
        return Identities(
            root=Identity(name="root", login=login, uid=uid, gid=gid, home=home, shell=shell, switch=False),
            user=Identity(name="user", login=login, uid=uid, gid=gid, home=home, shell=shell, switch=False),
        )
    found = _find_user(root) or _create_user(root, shell)
    if found is None:
        login, uid, gid, home = USER_NAME, USER_ID, USER_ID, "/tmp"
        groups: tuple[int, ...] = ()
    else:
        login, uid, gid, home = found
        home = _ensure_home(root, home, uid, gid)
        groups = _supplementary(root, login, gid)
    user = Identity(name="user", login=login, uid=uid, gid=gid, home=home, shell=shell, groups=groups)
    root_home = "/root" if os.path.isdir(root + "root") else "/"
    return Identities(
        user=user,
        root=Identity(name="root", login="root", uid=0, gid=0, home=root_home, shell=shell, switch=False),
    )


def fork_helper(
    main: Callable[[int, Identity], None], identity: Identity, kind: int
) -> tuple[int, socket.socket]:
    """Fork a helper child running ``main(fd, identity)`` on one end of a socket pair of ``kind``.

    Returns its pid and our non-blocking end. The child never returns: it exits 0 when ``main`` does, 70 with
    the traceback on stderr when it raises.
    """
    parent, child = socket.socketpair(socket.AF_UNIX, kind)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child, which never returns
        status = 70
        try:
            parent.close()
            main(child.detach(), identity)
            status = 0
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            os._exit(status)
    child.close()
    parent.setblocking(False)
    return pid, parent
