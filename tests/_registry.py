"""A real Docker registry (Debian's ``docker-registry``) on 127.0.0.1, and busybox images built with umoci,
for the image tests (tests/images/conftest.py) and the template benchmark (bench/templates.py).

Each registry runs on a free port with its own storage dir; its access log (stderr) is kept so tests can
count blob downloads. Images are built with umoci from a busybox-static root file system, one layer per
``umoci repack`` (so deletions become real OCI whiteouts), and pushed with skopeo. No pytest here: the
benchmark imports it too.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from _corral_server import free_port

REGISTRY_BIN = "docker-registry"
START_TIMEOUT = 20.0
MISSING = "docker-registry is not installed (Debian package docker-registry); run scripts/install-host-deps"


@dataclass
class Registry:
    host: str  # "127.0.0.1:PORT"
    log: list[str] = field(default_factory=list)
    user: str | None = None
    password: str | None = None

    def blob_gets(self, repo: str, digests: set[str] | None = None) -> int:
        """How many blobs (of ``digests``, "sha256:…", or any) were downloaded (GET, not HEAD) from ``repo``."""
        uri = re.compile(rf'http\.request\.uri="/v2/{re.escape(repo)}/blobs/(sha256:[0-9a-f]{{64}})"')
        count = 0
        for line in list(self.log):
            m = uri.search(line)
            if m and "http.request.method=GET" in line and "http.response.status=200" in line:
                count += digests is None or m[1] in digests
        return count

    def push(self, layout: Path, ref: str, repo_tag: str) -> str:
        argv = ["skopeo", "--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false"]
        if self.user:
            argv += ["--dest-creds", f"{self.user}:{self.password}"]
        subprocess.run(
            [*argv, f"oci:{layout}:{ref}", f"docker://{self.host}/{repo_tag}"], check=True, timeout=60
        )
        return f"{self.host}/{repo_tag}"


@contextmanager
def start_registry(tmp: Path, *, htpasswd: Path | None = None) -> Iterator[Registry]:
    """A registry storing under ``tmp``, stopped on exit; with ``htpasswd``, it wants basic auth."""
    if shutil.which(REGISTRY_BIN) is None:
        raise RuntimeError(MISSING)
    port = free_port()
    storage = tmp / "storage"
    storage.mkdir(parents=True)
    auth = f"auth:\n  htpasswd:\n    realm: corral-test\n    path: {htpasswd}\n" if htpasswd else ""
    config = tmp / "config.yml"
    config.write_text(
        "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\n"
        f"storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n{auth}"
    )
    proc = subprocess.Popen(
        [REGISTRY_BIN, "serve", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    registry = Registry(host=f"127.0.0.1:{port}")
    listening = threading.Event()

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            registry.log.append(line)
            if "listening on" in line:
                listening.set()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        if not listening.wait(START_TIMEOUT):
            raise RuntimeError("docker-registry did not start:\n" + "".join(registry.log[-20:]))
        yield registry
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        reader.join(timeout=5)


def umoci(*args: str) -> None:
    subprocess.run(["umoci", *args], check=True, timeout=120, capture_output=True)


def busybox_tree(root: Path) -> None:
    """A minimal root file system: busybox-static and its applets, passwd/group, a few dirs and files."""
    busybox = shutil.which("busybox")
    assert busybox is not None
    for d in ("bin", "etc", "tmp", "root", "home/user", "proc", "sys", "dev", "opt/old"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "tmp").chmod(0o1777)
    shutil.copy2(busybox, root / "bin" / "busybox")
    for applet in (
        "sh",
        "ls",
        "cat",
        "echo",
        "id",
        "stat",
        "test",
        "touch",
        "rm",
        "sync",
        "sleep",
        "pwd",
        "env",
    ):
        (root / "bin" / applet).symlink_to("busybox")
    (root / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\nuser:x:1000:\n")
    (root / "etc" / "gone").write_text("deleted by the second layer\n")
    (root / "opt" / "old" / "file").write_text("old\n")
    os.chown(root / "home" / "user", 1000, 1000)


def build_busybox(registry: Registry, tmp: Path, repo_tag: str) -> str:
    """Two layers: a busybox root, then a layer that deletes /etc/gone (whiteout), adds a hard link, and
    replaces /opt/old's contents. Config: env, workdir, cmd. Pushed as ``repo_tag``; returns its reference."""
    layout, bundle = tmp / "layout", tmp / "bundle"
    umoci("init", "--layout", str(layout))
    umoci("new", "--image", f"{layout}:t")
    umoci("unpack", "--image", f"{layout}:t", str(bundle))
    busybox_tree(bundle / "rootfs")
    umoci(
        "repack", "--refresh-bundle", "--image", f"{layout}:t", str(bundle)
    )  # refreshed: the next diffs on it
    rootfs = bundle / "rootfs"
    (rootfs / "etc" / "gone").unlink()
    (rootfs / "bin" / "data").write_text("linked\n")
    os.link(rootfs / "bin" / "data", rootfs / "bin" / "data-link")
    (rootfs / "opt" / "old" / "file").unlink()
    (rootfs / "opt" / "old" / "new").write_text("new\n")
    umoci("repack", "--image", f"{layout}:t", str(bundle))
    umoci(
        "config",
        "--image",
        f"{layout}:t",
        "--config.env",
        "GREETING=hello from the image",
        "--config.env",
        "PATH=/bin",
        "--config.workingdir",
        "/opt",
        "--config.cmd",
        "/bin/sh",
    )
    return registry.push(layout, "t", repo_tag)
