"""The guest every microVM boots: a Debian cloud kernel and an initramfs Corral builds itself.

Kernel: Debian's ``linux-image-<abi>-cloud-amd64``, fetched with ``apt-get download`` and unpacked with
``dpkg -x`` into the cache (never installed on the host). Its bzImage is LZ4-compressed; the ELF ``vmlinux``
inside is extracted (``lz4 -d``) because QEMU boots it through its PVH note, skipping the real-mode
decompressor. Its virtio, erofs and overlay drivers are modules, so the initramfs carries them.

Initramfs (newc cpio, built in Python, no ``mkinitramfs``): ``busybox-static``, the modules the guest needs
with their dependencies (read from each module's ``.modinfo`` ``depends=``, in load order) and the ``/init``
below. Both artifacts live under ``cache/microvm/`` by the content hash of their inputs (kernel package
version, busybox binary, module set, the init script), so a changed input builds anew and an unchanged one
costs a stat.

What ``/init`` does, in order (see :data:`INIT`): mount devtmpfs/proc/sys, load the modules, find each disk by
its virtio-blk ``serial`` (``corral-agent``, ``corral-upper``, ``corral-l<N>`` lowers topmost first,
``corral-b<N>`` binds), mount the ext4 upper and the erofs lowers as an overlay root, the binds and the agent
bundle read-only on top, cap processes with a guest cgroup (``pids.max``, ``cpu.max``), address ``eth0`` when the sandbox has network
(``corral.net4``/``gw4``/``net6``/``gw6``: the sandbox's veth addresses, see :mod:`.._net.netns`), open the
virtio-serial port named ``agent`` ONCE (reopening it loses data), and ``switch_root`` into the agent as
PID 1 with that fd as its stdin and stdout, and the guest's ``/proc/vmstat`` as its ``--oom-events-fd`` (the
kernel is the sandbox's own, so its ``oom_kill`` count tells the agent a SIGKILLed process was an OOM victim).
The agent's exit ends the guest (``panic=-1``, ``-no-reboot``).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from corral.errors import RuntimeFailure, RuntimeUnavailable
from corral.runtimes import _proc

__all__ = ["GUEST_MODULES", "Guest", "ensure_guest", "kernel_package"]

log = logging.getLogger("corral.runtimes.microvm.guest")

KERNEL_METAPACKAGE = "linux-image-cloud-amd64"
BUSYBOX = Path("/bin/busybox")
# What the guest needs that the cloud kernel builds as modules (their dependencies are added automatically).
GUEST_MODULES = ("virtio_mmio", "virtio_blk", "virtio_console", "virtio_net", "erofs", "overlay")
LZ4_LEGACY_MAGIC = b"\x02\x21\x4c\x18"
BUILD_VERSION = "1"  # bump when the build itself changes in a way the inputs below do not show

Progress = Callable[[str], None]

INIT = r"""#!/bin/busybox sh
# Corral microVM init: see corral/runtimes/microvm/guest.py. Runs as PID 1 from the initramfs.
/bin/busybox mkdir -p /proc /sys /dev /bin /sbin
/bin/busybox --install -s /bin
mount -t devtmpfs -o nosuid dev /dev
mount -t proc -o nosuid,nodev,noexec proc /proc
mount -t sysfs -o nosuid,nodev,noexec sys /sys
# any failure ends PID 1, so the kernel panics and QEMU (-no-reboot, panic=-1) exits: the host sees it at once
fail() { echo "corral-init: $*" >/dev/console; exit 1; }
while read -r m; do insmod "/modules/$m.ko" || fail "cannot load $m"; done </modules/order
CMDLINE=$(cat /proc/cmdline)
arg() { for w in $CMDLINE; do case "$w" in "corral.$1="*) echo "${w#*=}"; return;; esac; done; }
# the agent's port, opened once (a virtio console port allows one open, and reopening it loses data)
port="" i=0
while [ -z "$port" ] && [ $i -lt 500 ]; do
  for p in /sys/class/virtio-ports/*; do [ "$(cat "$p/name" 2>/dev/null)" = agent ] && port="/dev/${p##*/}"; done
  i=$((i + 1)); [ -n "$port" ] || usleep 10000
done
[ -n "$port" ] || fail "no agent port"
exec 3<>"$port"
# by serial: QEMU passes ours as given; Firecracker reports its drive id, which cannot hold a dash (`_`)
disk() {
  i=0
  while [ $i -lt 500 ]; do
    for d in /sys/block/vd*; do
      s=$(cat "$d/serial" 2>/dev/null)
      [ "$s" = "$1" ] || [ "$s" = "${1//-/_}" ] && { echo "/dev/${d##*/}"; return 0; }
    done
    i=$((i + 1)); usleep 10000
  done
  return 1
}
mkdir -p /mnt/upper /newroot /mnt/agent
up=$(disk corral-upper) || fail "no writable disk"
mount -t ext4 -o nosuid,nodev "$up" /mnt/upper || fail "cannot mount the writable disk"
mkdir -p /mnt/upper/upper /mnt/upper/work
lower="" n=0
while dev=$(arg "l$n") && [ -n "$dev" ]; do
  d=$(disk "corral-l$n") || fail "no layer disk $n"
  mkdir -p "/mnt/l$n"; mount -t erofs -o ro "$d" "/mnt/l$n" || fail "cannot mount layer $n"
  lower="$lower${lower:+:}/mnt/l$n"; n=$((n + 1))
done
[ -n "$lower" ] || fail "no template layers"
mount -t overlay -o "lowerdir=$lower,upperdir=/mnt/upper/upper,workdir=/mnt/upper/work" overlay /newroot \
  || fail "cannot mount the root overlay"
n=0
while target=$(arg "b$n") && [ -n "$target" ]; do
  d=$(disk "corral-b$n") || fail "no bind disk $n"
  mkdir -p "/newroot$target"; mount -t erofs -o ro,nodev "$d" "/newroot$target" || fail "cannot mount $target"
  n=$((n + 1))
done
ag=$(disk corral-agent) || fail "no agent disk"
mkdir -p /newroot/.corral; mount -t erofs -o ro,nodev "$ag" /newroot/.corral || fail "cannot mount the agent"
mkdir -p /newroot/dev /newroot/proc /newroot/sys /newroot/tmp
mount --move /dev /newroot/dev; mount --move /proc /newroot/proc; mount --move /sys /newroot/sys
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts -o nosuid,noexec,newinstance,ptmxmode=0666,mode=0620 devpts /newroot/dev/pts
ln -sf pts/ptmx /newroot/dev/ptmx 2>/dev/null
mount -t tmpfs -o nosuid,nodev,mode=1777 shm /newroot/dev/shm
mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 /newroot/sys/fs/cgroup || fail "no cgroup2"
echo "+pids +cpu +memory" >/newroot/sys/fs/cgroup/cgroup.subtree_control
mkdir /newroot/sys/fs/cgroup/sandbox
echo "$(arg pids)" >/newroot/sys/fs/cgroup/sandbox/pids.max
cpu=$(arg cpu); [ -n "$cpu" ] && echo "$cpu 100000" >/newroot/sys/fs/cgroup/sandbox/cpu.max
echo $$ >/newroot/sys/fs/cgroup/sandbox/cgroup.procs
hostname "$(arg hostname)"
ip link set lo up
# network (only a sandbox with a policy has a NIC): the addresses of its veth, the host end as the gateway
# and the egress path's answerer as the resolver; no router advertisements, no autoconfiguration
net4=$(arg net4)
if [ -n "$net4" ]; then
  i=0; while [ ! -e /newroot/sys/class/net/eth0 ] && [ $i -lt 500 ]; do i=$((i + 1)); usleep 10000; done
  for k in accept_ra autoconf accept_dad; do
    for c in all default eth0; do echo 0 >"/newroot/proc/sys/net/ipv6/conf/$c/$k" 2>/dev/null; done
  done
  ip link set eth0 up || fail "no network device"
  ip addr add "$net4" dev eth0 && ip route add default via "$(arg gw4)" || fail "cannot address eth0"
  net6=$(arg net6)
  if [ -n "$net6" ]; then
    ip -6 addr add "$net6" dev eth0 && ip -6 route add default via "$(arg gw6)" || fail "cannot address eth0"
  fi
  rm -f /newroot/etc/resolv.conf
  printf 'nameserver %s\noptions ndots:0\n' "$(arg gw4)" >/newroot/etc/resolv.conf
fi
loader=$(arg loader)
# the agent is the guest's OOM killer too, at 90% of its RAM in use (page cache not counted), so a bomb dies
# before the kernel thrashes the page cache (the agent's own code included) on its way to its own OOM kill
memtotal=$(sed -n 's/^MemTotal: *\([0-9]*\) kB$/\1/p' /newroot/proc/meminfo)
exec switch_root /newroot "/.corral/lib/$loader" --library-path /.corral/lib /.corral/bin/python3 \
  -I -S -B -m corral.agent --sudo --memory-limit $((memtotal * 1024)) --memory-available \
  --oom-events-fd 4 0<&3 1>&3 3>&- 4</newroot/proc/vmstat
"""


@dataclass(frozen=True, kw_only=True)
class Guest:
    kernel: Path  # an ELF vmlinux (PVH) extracted from the Debian package
    initramfs: Path
    kernel_version: str  # the module ABI ("6.1.0-57-cloud-amd64")


def _say(progress: Progress | None, message: str) -> None:
    log.info("%s", message)
    if progress is not None:
        progress(message)


def kernel_package() -> tuple[str, str]:
    """(package, version) of the cloud kernel apt would install now: ``linux-image-<abi>-cloud-amd64``."""
    apt_cache = _proc.require_binary("apt-cache")
    out = _proc.run_blocking(
        [apt_cache, "depends", KERNEL_METAPACKAGE],
        timeout=60,
        what="look up Debian's cloud kernel package",
        check=False,
    )
    match = re.search(r"Depends:\s*(linux-image-\S+-cloud-amd64)", out.stdout.decode(errors="replace"))
    if match is None:
        raise RuntimeUnavailable(
            f"apt knows no {KERNEL_METAPACKAGE}; the microvm guest kernel comes from Debian "
            "(enable the Debian main archive and run: apt-get update)",
            details={"install": "apt-get update", "package": KERNEL_METAPACKAGE},
        )
    package = match.group(1)
    policy = _proc.run_blocking(
        [apt_cache, "policy", package], timeout=60, what="look up the kernel package version"
    )
    version = re.search(r"Candidate:\s*(\S+)", policy.stdout.decode(errors="replace"))
    if version is None or version.group(1) == "(none)":
        raise RuntimeUnavailable(f"apt has no installable {package}; run: apt-get update")
    return package, version.group(1)


def ensure_guest(cache_root: Path, *, progress: Progress | None = None) -> Guest:
    """The kernel and initramfs for this host's Debian kernel package, building what is missing."""
    root = cache_root / "microvm"
    kernel_dir = _ensure_kernel(root, progress)
    abi = next((kernel_dir / "lib" / "modules").iterdir()).name
    initramfs = _ensure_initramfs(root, kernel_dir, abi, progress)
    return Guest(kernel=kernel_dir / "vmlinux", initramfs=initramfs, kernel_version=abi)


def _ensure_kernel(root: Path, progress: Progress | None) -> Path:
    package, version = kernel_package()
    key = hashlib.sha256(f"{BUILD_VERSION}:{package}={version}".encode()).hexdigest()[:16]
    target = root / "kernel" / key
    if (target / "vmlinux").exists():
        return target
    _say(progress, f"Downloading the guest kernel ({package} {version})…")
    (root / "kernel").mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=root / "kernel"))
    try:
        download = tmp / "deb"
        download.mkdir()
        download.chmod(0o777)  # apt-get download runs as the unprivileged _apt user
        _proc.run_blocking(
            [_proc.require_binary("apt-get"), "download", "-q", f"{package}={version}"],
            timeout=600,
            what=f"download {package}",
            cwd=download,
        )
        deb = next(download.glob("*.deb"))
        tree = tmp / "tree"
        _proc.run_blocking(
            [_proc.require_binary("dpkg"), "-x", str(deb), str(tree)], timeout=300, what="unpack the kernel"
        )
        _say(progress, "Extracting the guest kernel…")
        bz = next((tree / "boot").glob("vmlinuz-*"))
        _extract_vmlinux(bz, tmp / "vmlinux")
        (tmp / "lib").mkdir()
        shutil.move(tree / "lib" / "modules", tmp / "lib" / "modules")
        shutil.rmtree(tree)
        shutil.rmtree(download)
        _publish(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _extract_vmlinux(bzimage: Path, dest: Path) -> None:
    """The ELF kernel inside an LZ4 bzImage (what the kernel's scripts/extract-vmlinux does)."""
    data = bzimage.read_bytes()
    start = data.find(LZ4_LEGACY_MAGIC)
    if start < 0:
        raise RuntimeFailure("the guest kernel is not LZ4-compressed; cannot extract vmlinux")
    lz4 = _proc.require_binary("lz4")
    # the payload is followed by the rest of the bzImage, which lz4 reports as an error after the frame
    out = _proc.run_blocking(
        [lz4, "-dc"], input=data[start:], timeout=120, what="extract the guest kernel", check=False
    )
    if not out.stdout.startswith(b"\x7fELF"):
        raise RuntimeFailure("could not extract vmlinux from the guest kernel")
    dest.write_bytes(out.stdout)


def _module_index(modules_root: Path) -> dict[str, Path]:
    return {p.name.removesuffix(".ko").replace("-", "_"): p for p in modules_root.rglob("*.ko")}


def _depends(ko: Path) -> list[str]:
    """A module's ``depends=`` from its ``.modinfo`` (NUL-separated key=value strings)."""
    data = ko.read_bytes()
    at = data.find(b"\0depends=")
    if at < 0:
        return []
    end = data.index(b"\0", at + 1)
    value = data[at + len(b"\0depends=") : end].decode()
    return [d.replace("-", "_") for d in value.split(",") if d]


def module_load_order(modules_root: Path, wanted: tuple[str, ...]) -> list[Path]:
    """``wanted`` and everything they depend on, dependencies first."""
    index = _module_index(modules_root)
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        if name not in index:
            raise RuntimeFailure(f"the guest kernel has no module {name}")
        for dep in _depends(index[name]):
            visit(dep)
        order.append(index[name])

    for name in wanted:
        visit(name)
    return order


def _ensure_initramfs(root: Path, kernel_dir: Path, abi: str, progress: Progress | None) -> Path:
    if not BUSYBOX.exists():
        raise RuntimeUnavailable(
            "the microvm guest needs busybox-static; install it with: apt-get install busybox-static",
            details={"install": "apt-get install busybox-static"},
        )
    modules = module_load_order(kernel_dir / "lib" / "modules" / abi, GUEST_MODULES)
    h = hashlib.sha256(f"{BUILD_VERSION}:{abi}".encode())
    h.update(hashlib.sha256(BUSYBOX.read_bytes()).digest())
    h.update(INIT.encode())
    for ko in modules:
        h.update(ko.name.encode())
        h.update(hashlib.sha256(ko.read_bytes()).digest())
    target = root / "initramfs" / f"{h.hexdigest()[:16]}.cpio"
    if target.exists():
        return target
    _say(progress, "Building the guest initramfs…")
    target.parent.mkdir(parents=True, exist_ok=True)
    archive = _Cpio()
    for d in ("bin", "dev", "proc", "sys", "modules", "mnt", "newroot"):
        archive.add_dir(d)
    archive.add_file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    archive.add_file("init", INIT.encode(), 0o755)
    names = []
    for ko in modules:
        name = ko.name.removesuffix(".ko")
        names.append(name)
        archive.add_file(f"modules/{name}.ko", ko.read_bytes(), 0o644)
    archive.add_file("modules/order", ("\n".join(names) + "\n").encode(), 0o644)
    fd, tmp = tempfile.mkstemp(prefix=".build-", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(archive.finish())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


class _Cpio:
    """A newc (SVR4, no CRC) cpio archive, the format the kernel unpacks as an initramfs."""

    def __init__(self) -> None:
        self._buf = io.BytesIO()
        self._ino = 1

    def _entry(self, name: str, mode: int, data: bytes) -> None:
        fields = [self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0]
        header = b"070701" + b"".join(f"{v:08x}".encode() for v in fields)
        self._ino += 1
        self._buf.write(header + name.encode() + b"\0")
        self._pad()
        self._buf.write(data)
        self._pad()

    def _pad(self) -> None:
        self._buf.write(b"\0" * (-self._buf.tell() % 4))

    def add_dir(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755, b"")

    def add_file(self, name: str, data: bytes, mode: int) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0, b"")
        return self._buf.getvalue()


def _publish(tmp: Path, target: Path) -> None:
    try:
        tmp.rename(target)
    except OSError:  # another process built it first
        shutil.rmtree(tmp, ignore_errors=True)
