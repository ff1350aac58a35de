"""Root file systems that are not pulled from a registry: the host template, directories, tarballs, debootstrap.

Ownership convention (shared with every layer, see :mod:`corral.runtimes._rootfs`): files are owned by the
uids they should have *inside* a sandbox (root = 0, the default user = 1000).

The default template, ``base`` (:func:`ensure_host_template`), is a skeleton directory plus the host's
``/usr`` bound read-only: sandboxes see the host's installed programs, and none of its data. Its ``/etc`` is
generated or copied from an allowlist of harmless host files; secrets (shadow, ssh host keys, machine-id,
apt credentials, TLS private keys) are never copied.

Tarballs are unpacked once per content digest into the layer store (defensively: :mod:`._extract`).
``debootstrap:SUITE`` runs Debian's debootstrap against the mirror this host's apt already uses (as
``scripts/install-host-deps`` does) into the layer store, once per suite/mirror/architecture.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

from corral.errors import InvalidRequest
from corral.images._extract import Devices, UnsafeMember, safe_extract
from corral.images.layers import LayerResult, LayerStore
from corral.runtimes import _proc
from corral.runtimes._rootfs import SANDBOX_USER_UID
from corral.runtimes.base import Bind, HostLayers

__all__ = [
    "debian_mirror",
    "debootstrap_layer",
    "ensure_host_template",
    "rootfs_from_directory",
    "tarball_layer",
]

TEMPLATE_VERSION = 1  # bump when the skeleton below changes, so hosts rebuild it
HOST_ETC = Path("/etc")

# host /etc entries copied into the template (files, symlinks or whole directories); nothing else is
_ETC_ALLOW = (
    "nsswitch.conf",
    "resolv.conf",
    "host.conf",
    "gai.conf",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "ca-certificates.conf",
    "alternatives",
    "localtime",
    "timezone",
    "os-release",
    "debian_version",
    "profile",
    "profile.d",
    "bash.bashrc",
    "inputrc",
    "environment",
    "mime.types",
    "protocols",
    "services",
    "networks",
    "ethertypes",
    "locale.alias",
    "locale.gen",
    "login.defs",
    "shells",
    "skel",
    "magic",
    "magic.mime",
    "mke2fs.conf",
    "python3",
    "python3.11",
    "python3.12",
    "python3.13",
    "gitconfig",
    "manpath.config",
    "adduser.conf",
    "deluser.conf",
    "issue",
    "perl",
    "ssl/openssl.cnf",
    "ssl/certs",
)
_USERS_DB = (
    "root:x:0:0:root:/root:/bin/bash\n"
    "user:x:1000:1000:sandbox user:/home/user:/bin/bash\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
)
_GROUP = "root:x:0:\nshadow:x:42:\nusers:x:100:user\nuser:x:1000:\nnogroup:x:65534:\n"
_SHADOW = "root:*:19000:0:99999:7:::\nuser:*:19000:0:99999:7:::\nnobody:*:19000:0:99999:7:::\n"
_HOSTS = "127.0.0.1\tlocalhost sandbox\n::1\tlocalhost ip6-localhost ip6-loopback\n"


def _etc_digest() -> str:
    """Changes when an allowed host file changes (a CA update, a new alternative), so the template follows."""
    h = hashlib.sha256(f"v{TEMPLATE_VERSION}".encode())
    for name in _ETC_ALLOW:
        with contextlib.suppress(OSError):
            st = (HOST_ETC / name).lstat()
            h.update(f"{name}:{st.st_mtime_ns}:{st.st_size}".encode())
    return h.hexdigest()[:16]


def ensure_host_template(cache_root: Path) -> HostLayers:
    """The ``base`` template: skeleton dirs, a safe ``/etc``, and the host's ``/usr`` bound read-only.

    Built once per host (atomically: built in a temporary directory and renamed), rebuilt when an allowed
    ``/etc`` file changes.
    """
    root = cache_root / "templates"
    target = root / f"base-{_etc_digest()}"
    if not target.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
        try:
            _build_skeleton(tmp)
            try:
                tmp.rename(target)
            except OSError:  # another process built it first
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    binds = [Bind(source=Path("/usr"), target="/usr")]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):  # hosts without a merged /usr
        host = Path("/") / name
        if host.is_dir() and not host.is_symlink():
            binds.append(Bind(source=host, target=f"/{name}"))
    return HostLayers(lower=(target,), binds=tuple(binds))


def _build_skeleton(dest: Path) -> None:
    dest.chmod(0o755)
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        host = Path("/") / name
        if host.is_symlink():
            (dest / name).symlink_to(os.readlink(host))
        elif host.is_dir():
            (dest / name).mkdir()
    for d, mode in (
        ("usr", 0o755),
        ("etc", 0o755),
        ("root", 0o700),
        ("home", 0o755),
        ("tmp", 0o1777),
        ("var", 0o755),
        ("var/tmp", 0o1777),
        ("var/lib", 0o755),
        ("var/log", 0o755),
        ("var/cache", 0o755),
        ("run", 0o755),
        ("proc", 0o555),
        ("sys", 0o555),
        ("dev", 0o755),
        ("mnt", 0o755),
        ("opt", 0o755),
        ("srv", 0o755),
        ("media", 0o755),
        (".corral", 0o755),
        ("etc/ssl", 0o755),
        ("usr/local", 0o755),
    ):
        (dest / d).mkdir(exist_ok=True)
        (dest / d).chmod(mode)
    (dest / "var/run").symlink_to("../run")
    etc = dest / "etc"
    for name in _ETC_ALLOW:
        src = HOST_ETC / name
        if src.is_symlink():
            (etc / name).symlink_to(os.readlink(src))
        elif src.is_dir():
            shutil.copytree(src, etc / name, symlinks=True)
        elif src.is_file():
            shutil.copy2(src, etc / name, follow_symlinks=False)
    for name, text, mode in (
        ("passwd", _USERS_DB, 0o644),
        ("group", _GROUP, 0o644),
        ("shadow", _SHADOW, 0o640),
        ("hosts", _HOSTS, 0o644),
        ("hostname", "sandbox\n", 0o644),
    ):
        (etc / name).write_text(text)
        (etc / name).chmod(mode)
    with contextlib.suppress(FileExistsError):
        (etc / "mtab").symlink_to("../proc/self/mounts")
    for dirpath, dirnames, filenames in os.walk(dest):  # everything belongs to the sandbox's root …
        for n in (*dirnames, *filenames):
            os.lchown(os.path.join(dirpath, n), 0, 0)
    os.chown(etc / "shadow", 0, 42)
    home = dest / "home" / "user"  # … except the default user's home
    home.mkdir(mode=0o755)
    os.chown(home, SANDBOX_USER_UID, SANDBOX_USER_UID)
    os.chown(dest, 0, 0)


def rootfs_from_directory(path: Path) -> HostLayers:
    """A template from an existing directory tree (owned by in-sandbox uids, see the module docstring)."""
    path = path.resolve()
    if not path.is_dir():
        raise InvalidRequest("the root file system directory does not exist", details={"path": path.name})
    return HostLayers(lower=(path,))


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tarball_layer(path: Path, layers: LayerStore) -> LayerResult:
    """Unpack a root file system tarball (any compression tarfile reads) as one layer, once per digest.

    Device nodes and FIFOs are skipped (``tar c`` of a root file system carries /dev), anything unsafe fails
    the whole tarball (see :mod:`._extract`).
    """
    if not path.is_file():
        raise InvalidRequest("the root file system tarball does not exist", details={"tarball": path.name})

    def fill(dest: Path) -> None:
        try:
            with tarfile.open(path) as tar:
                safe_extract(tar, dest, devices=Devices.SKIP)
        except UnsafeMember as exc:
            raise InvalidRequest(
                f"the root file system tarball cannot be unpacked safely: {exc}",
                details={"tarball": path.name},
            ) from exc
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise InvalidRequest(
                "the root file system tarball is not a readable tar archive", details={"tarball": path.name}
            ) from exc

    return layers.build(f"tar-{_file_digest(path)[:32]}", fill)


def debian_mirror(
    sources: tuple[Path, ...] = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d")),
) -> str:
    """The first Debian archive mirror in this host's apt sources (not the security archive)."""
    lines: list[str] = []
    for src in sources:
        files = sorted(src.glob("*.sources")) + sorted(src.glob("*.list")) if src.is_dir() else [src]
        for f in files:
            with contextlib.suppress(OSError):
                lines += f.read_text().splitlines()
    for line in lines:
        words = line.split()
        if words[:1] == ["URIs:"] or words[:1] == ["deb"]:
            for uri in words[1:]:
                web = uri.startswith(("http://", "https://"))
                if web and "security" not in uri and uri.rstrip("/").endswith("/debian"):
                    return uri
    raise InvalidRequest("no Debian mirror found in this host's apt sources; debootstrap needs one")


DEBOOTSTRAP_TIMEOUT = 1800.0  # a minbase bookworm is ~40 MiB of packages; generous for a slow mirror


def debootstrap_layer(suite: str, layers: LayerStore, *, mirror: str | None = None) -> LayerResult:
    """``debootstrap --variant=minbase SUITE`` as one layer, once per suite and mirror (blocking)."""
    if not suite.isalnum():
        raise InvalidRequest(f"{suite!r} is not a Debian suite name (e.g. bookworm)")
    mirror = mirror or debian_mirror()
    arch = os.uname().machine
    key = "debootstrap-" + hashlib.sha256(f"{suite}|{mirror}|{arch}".encode()).hexdigest()[:32]

    def fill(dest: Path) -> None:
        debootstrap = _proc.require_binary("debootstrap")
        _proc.run_blocking(  # dest is the layer store's private, empty temporary directory
            [debootstrap, "--variant=minbase", suite, str(dest), mirror],
            timeout=DEBOOTSTRAP_TIMEOUT,
            what=f"debootstrap {suite}",
        )
        for junk in ("dev", "proc", "sys"):  # the runtimes mount their own; device nodes stay out
            shutil.rmtree(dest / junk, ignore_errors=True)
            (dest / junk).mkdir(mode=0o755)
        shutil.rmtree(dest / "var/cache/apt/archives", ignore_errors=True)
        (dest / "var/cache/apt/archives/partial").mkdir(parents=True, exist_ok=True)

    return layers.build(key, fill)
