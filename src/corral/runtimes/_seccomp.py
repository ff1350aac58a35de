"""The seccomp filter of namespace sandboxes, built with libseccomp through ctypes.

Namespace sandboxes share the host kernel, so the syscall surface is the main thing between hostile code
and a kernel bug. The filter allows everything by default (so ordinary programs, compilers and language
runtimes work unchanged) and refuses the calls an unprivileged sandbox never needs and that keep showing up
in kernel exploits. The list follows Docker's default profile (moby ``profiles/seccomp/default.json``)
for a container without CAP_SYS_ADMIN, plus the newer mount API, io_uring and userfaultfd:

- mounts and namespaces: ``mount umount2 pivot_root fsopen fsconfig fsmount fspick move_mount open_tree
  mount_setattr unshare setns`` and ``clone`` with any CLONE_NEW* flag (a second user namespace is the usual
  first step of an exploit: it hands out CAP_SYS_ADMIN over fresh namespaces);
- ``clone3`` answers ENOSYS instead of EPERM: its flags live in a struct seccomp cannot read, and ENOSYS makes
  glibc fall back to ``clone``, where the flags are checked;
- other processes' memory: ``ptrace process_vm_readv process_vm_writev kcmp pidfd_getfd``;
- kernel subsystems with a long CVE record: ``bpf perf_event_open userfaultfd io_uring_*``, the keyring
  (``keyctl add_key request_key``), ``open_by_handle_at name_to_handle_at`` (the "shocker" escape),
  ``fanotify_init lookup_dcookie``;
- host administration: modules, kexec, ``reboot swapon swapoff syslog acct quotactl quotactl_fd settimeofday
  clock_settime clock_adjtime adjtimex iopl ioperm vhangup uselib personality-less vm86`` and friends;
- raw network access: ``socket(AF_PACKET, …)`` and ``socket(AF_INET/AF_INET6, SOCK_RAW, …)`` (netlink raw
  sockets stay allowed so ``ip addr`` works).

Only the native architecture is allowed: libseccomp kills a thread that makes a 32-bit (``int 0x80``) or x32
call, which would otherwise bypass a filter keyed on x86_64 syscall numbers.

bubblewrap loads the exported program (``--seccomp FD``) right before it execs the sandbox's first process,
after its own namespace set-up, and sets no_new_privs, so the filter binds every process in the sandbox.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import socket
import tempfile
from pathlib import Path

from corral.errors import RuntimeUnavailable

__all__ = ["DENIED_SYSCALLS", "build_filter", "write_filter"]

# syscalls answered with EPERM; names the running kernel/arch does not know are skipped
DENIED_SYSCALLS: tuple[str, ...] = (
    # mounts and namespaces
    "mount",
    "umount",
    "umount2",
    "pivot_root",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "move_mount",
    "open_tree",
    "mount_setattr",
    "unshare",
    "setns",
    # other processes' memory
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "kcmp",
    "pidfd_getfd",
    # risky kernel subsystems
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "keyctl",
    "add_key",
    "request_key",
    "open_by_handle_at",
    "name_to_handle_at",
    "fanotify_init",
    "lookup_dcookie",
    # host administration
    "init_module",
    "finit_module",
    "delete_module",
    "create_module",
    "query_module",
    "get_kernel_syms",
    "kexec_load",
    "kexec_file_load",
    "reboot",
    "swapon",
    "swapoff",
    "syslog",
    "acct",
    "quotactl",
    "quotactl_fd",
    "settimeofday",
    "stime",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
    "iopl",
    "ioperm",
    "vhangup",
    "uselib",
    "ustat",
    "sysfs",
    "_sysctl",
    "nfsservctl",
    "vm86",
    "vm86old",
)
ENOSYS_SYSCALLS: tuple[str, ...] = ("clone3",)
# every CLONE_NEW* flag clone() accepts (CLONE_NEWTIME only exists for clone3/unshare)
CLONE_NS_FLAGS: tuple[int, ...] = (
    0x00020000,
    0x02000000,
    0x04000000,
    0x08000000,
    0x10000000,
    0x20000000,
    0x40000000,
)

_SCMP_ACT_ALLOW = 0x7FFF0000
_SCMP_CMP_EQ = 4
_SCMP_CMP_MASKED_EQ = 7
_SOCK_TYPE_MASK = 0xF  # socket() type also carries SOCK_NONBLOCK / SOCK_CLOEXEC
_SOCK_RAW = 3


def _act_errno(err: int) -> int:
    return 0x00050000 | (err & 0xFFFF)


class _ArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


def _load() -> ctypes.CDLL:
    name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as exc:
        raise RuntimeUnavailable(
            "namespace sandboxes need libseccomp; install it with: apt-get install libseccomp2",
            details={"install": "apt-get install libseccomp2"},
        ) from exc
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_syscall_resolve_name.restype = ctypes.c_int
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.restype = ctypes.c_int
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(_ArgCmp),
    ]
    lib.seccomp_export_bpf.restype = ctypes.c_int
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    return lib


def _rule(lib: ctypes.CDLL, ctx: int, action: int, name: str, *cmps: tuple[int, int, int, int]) -> bool:
    nr = lib.seccomp_syscall_resolve_name(name.encode())
    if nr < 0:  # not a syscall on this architecture (e.g. vm86 on x86_64)
        return False
    arr = (_ArgCmp * max(1, len(cmps)))(*(_ArgCmp(*c) for c in cmps))
    rc = lib.seccomp_rule_add_array(ctx, action, nr, len(cmps), arr)
    if rc < 0:
        raise OSError(-rc, f"seccomp_rule_add({name}): {os.strerror(-rc)}")
    return True


def build_filter() -> bytes:
    """Compile the sandbox filter to a classic BPF program (the bytes bwrap's ``--seccomp`` reads)."""
    lib = _load()
    ctx = lib.seccomp_init(_SCMP_ACT_ALLOW)
    if not ctx:
        raise OSError(errno.ENOMEM, "seccomp_init failed")
    try:
        eperm = _act_errno(errno.EPERM)
        for name in DENIED_SYSCALLS:
            _rule(lib, ctx, eperm, name)
        for name in ENOSYS_SYSCALLS:
            _rule(lib, ctx, _act_errno(errno.ENOSYS), name)
        for flag in CLONE_NS_FLAGS:  # rules are OR-ed: any namespace flag is refused
            _rule(lib, ctx, eperm, "clone", (0, _SCMP_CMP_MASKED_EQ, flag, flag))
        _rule(lib, ctx, eperm, "socket", (0, _SCMP_CMP_EQ, socket.AF_PACKET, 0))
        for family in (socket.AF_INET, socket.AF_INET6):  # comparisons within one rule are AND-ed
            _rule(
                lib,
                ctx,
                eperm,
                "socket",
                (0, _SCMP_CMP_EQ, family, 0),
                (1, _SCMP_CMP_MASKED_EQ, _SOCK_TYPE_MASK, _SOCK_RAW),
            )
        with tempfile.TemporaryFile() as f:
            rc = lib.seccomp_export_bpf(ctx, f.fileno())
            if rc < 0:
                raise OSError(-rc, f"seccomp_export_bpf: {os.strerror(-rc)}")
            f.seek(0)
            return f.read()
    finally:
        lib.seccomp_release(ctx)


def write_filter(path: Path, program: bytes) -> None:
    """Write a compiled program where the shim opens it for bwrap (mode 0600: it is only read by root)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(program)
