"""A real Docker registry (Debian's ``docker-registry``) on 127.0.0.1, and images the tests build themselves.

Each registry runs on a free port with its own storage dir; its access log (stderr) is kept so tests can
count blob downloads. Images are built with umoci from a busybox-static root file system, one layer per
``umoci repack`` (so deletions become real OCI whiteouts), and pushed with skopeo. Hand-made layers (opaque
directories, malicious members) are written as a raw OCI layout and pushed the same way.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REGISTRY_BIN = "docker-registry"
START_TIMEOUT = 20.0


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(tmp: Path, *, htpasswd: Path | None = None) -> Iterator[Registry]:
    if shutil.which(REGISTRY_BIN) is None:
        pytest.fail(
            "docker-registry is not installed (Debian package docker-registry); run scripts/install-host-deps"
        )
    port = _free_port()
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


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    yield from _start(tmp_path_factory.mktemp("registry"))


@pytest.fixture(scope="session")
def auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    tmp = tmp_path_factory.mktemp("auth-registry")
    out = subprocess.run(["htpasswd", "-nbB", "alice", "s3cret"], check=True, capture_output=True, text=True)
    (tmp / "htpasswd").write_text(out.stdout.strip() + "\n")
    for registry in _start(tmp, htpasswd=tmp / "htpasswd"):
        registry.user, registry.password = "alice", "s3cret"
        yield registry


# --- images ------------------------------------------------------------------------------------------------


def _busybox_tree(root: Path) -> None:
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


@pytest.fixture(scope="session")
def busybox_image(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Two layers: a busybox root, then a layer that deletes /etc/gone (whiteout), adds a hard link, and
    replaces /opt/old's contents. Config: env, workdir, cmd."""
    return _build_busybox(registry, tmp_path_factory.mktemp("bb-image"), "test/busybox:1")


def _build_busybox(registry: Registry, tmp: Path, repo_tag: str) -> str:
    layout, bundle = tmp / "layout", tmp / "bundle"
    run = lambda *a: subprocess.run(["umoci", *a], check=True, timeout=60, capture_output=True)  # noqa: E731
    run("init", "--layout", str(layout))
    run("new", "--image", f"{layout}:t")
    run("unpack", "--image", f"{layout}:t", str(bundle))
    _busybox_tree(bundle / "rootfs")
    run(
        "repack", "--refresh-bundle", "--image", f"{layout}:t", str(bundle)
    )  # refreshed: the next diffs on it
    rootfs = bundle / "rootfs"
    (rootfs / "etc" / "gone").unlink()
    (rootfs / "bin" / "data").write_text("linked\n")
    os.link(rootfs / "bin" / "data", rootfs / "bin" / "data-link")
    (rootfs / "opt" / "old" / "file").unlink()
    (rootfs / "opt" / "old" / "new").write_text("new\n")
    run("repack", "--image", f"{layout}:t", str(bundle))
    run(
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


# --- hand-made layers ---------------------------------------------------------------------------------------


def tar_bytes(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def member(name: str, kind: bytes = tarfile.REGTYPE, **kw: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    for k, v in kw.items():
        setattr(info, k, v)
    return info


def write_layout(dest: Path, layers: list[bytes], ref: str = "t") -> Path:
    """A minimal OCI image layout holding gzip'd ``layers`` (bottom first), for skopeo to push."""
    blobs = dest / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def blob(data: bytes) -> dict[str, object]:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return {"digest": f"sha256:{digest}", "size": len(data)}

    descs, diff_ids = [], []
    for raw in layers:
        diff_ids.append("sha256:" + hashlib.sha256(raw).hexdigest())
        descs.append(
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **blob(gzip.compress(raw, mtime=0))}
        )
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            **blob(json.dumps(config).encode()),
        },
        "layers": descs,
    }
    mdesc = {
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        **blob(json.dumps(manifest).encode()),
        "annotations": {"org.opencontainers.image.ref.name": ref},
    }
    (dest / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (dest / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [mdesc]}))
    return dest
