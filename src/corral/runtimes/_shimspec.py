"""What a sandbox's shim is told to do (``STATE_DIR/shim.json``): the host side's value objects.

The shim (``_shim.py``) reads the JSON back into plain attribute objects instead of these dataclasses: it is
a fresh ``python -I -S`` process per sandbox, started on every cold create, and importing ``dataclasses``
costs it ~8 ms (the ``inspect`` module and what that pulls in).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

__all__ = ["FdFile", "Mount", "ShimSpec", "UserNs"]


@dataclass(frozen=True, kw_only=True)
class Mount:
    """One mount made in the sandbox's private mount namespace, in order.

    kind: ``bind`` (``ro`` honoured), ``overlay`` (``options`` = overlay data), ``tmpfs`` (``options`` =
    data), ``idmap`` (a recursive, idmapped clone of ``source`` at ``target`` mapped like the user namespace,
    so files owned by host root appear owned by the sandbox's root), ``loop`` (the image file ``source``
    attached to a free loop device that detaches itself once unmounted, mounted as ``fstype`` with
    ``options``: a size-capped file system, e.g. for a sandbox's writable layer).
    """

    kind: str
    target: str
    source: str = "none"
    options: str = ""
    ro: bool = False
    fstype: str = ""


@dataclass(frozen=True, kw_only=True)
class UserNs:
    base: int  # host uid/gid that sandbox uid 0 maps to
    size: int = 65536
    # capabilities left in the bounding set once inside (None: all). The command still starts with every
    # capability of the namespace (they are made inheritable first), but nothing it execs can regain the others.
    bounding_caps: list[int] | None = None


@dataclass(frozen=True, kw_only=True)
class FdFile:
    """A host file opened as descriptor ``fd`` of the sandbox command (bwrap's ``--seccomp 9``).

    Opened by the shim's child after its mounts and before it enters the user namespace (where host root's
    files are out of reach), and moved into place right before exec, after every other descriptor was
    closed, so nothing else leaks into the sandbox.
    """

    fd: int
    path: str
    write: bool = False  # opened read-write (a VM's writable disk), else read-only


@dataclass(frozen=True, kw_only=True)
class ShimSpec:
    argv: list[str]
    socket: str  # the agent protocol, relayed to and from the agent's stdio
    control: str | None = None  # the shim's own control channel (deadline, status, checkpoint, restore)
    env: dict[str, str] = field(default_factory=dict)
    cgroup_procs: list[str] = field(default_factory=list)  # cgroup.procs files to join before anything else
    mounts: list[Mount] = field(default_factory=list)  # non-empty ⇒ private mount namespace
    userns: UserNs | None = None
    kill_argv: list[str] | None = None  # how to kill the sandbox if SIGKILL to the child is not enough
    deadline: float | None = None
    files: list[FdFile] = field(default_factory=list)  # opened as the given fds of the sandbox command
    # checkpoint/restore (gVisor): ``checkpoint`` (control op) runs checkpoint_argv, after which the sandbox
    # command exits and the shim waits, paused; ``restore`` starts restore_argv in its place with new pipes.
    # ``restored``: ``argv`` itself restores a checkpoint (a fork, or a template with memory), so the agent's
    # hello, which a restored agent does not send again, is read from ``hello_file``.
    checkpoint_argv: list[str] | None = None
    restore_argv: list[str] | None = None
    restore_files: list[FdFile] = field(default_factory=list)  # ``files`` of restore_argv (its image)
    restored: bool = False
    hello_file: str | None = None
    netns: str | None = None  # a network namespace file (/run/netns/…) the sandbox joins instead of its own
    # a restored agent is first sent ``restored`` with fresh host entropy and the host's time (VMs: each
    # restore of one memory image would otherwise continue the same guest RNG state, with a clock that stood
    # still while it was on disk)
    announce_restore: bool = False

    def to_json(self) -> str:
        data = {k: v for k, v in self.__dict__.items()}
        data["mounts"] = [m.__dict__ for m in self.mounts]
        data["userns"] = self.userns.__dict__ if self.userns else None
        data["files"] = [f.__dict__ for f in self.files]
        data["restore_files"] = [f.__dict__ for f in self.restore_files]
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> ShimSpec:
        data = json.loads(text)
        data["mounts"] = [Mount(**m) for m in data.get("mounts", [])]
        data["userns"] = UserNs(**data["userns"]) if data.get("userns") else None
        data["files"] = [FdFile(**f) for f in data.get("files", [])]
        data["restore_files"] = [FdFile(**f) for f in data.get("restore_files", [])]
        return cls(**data)
