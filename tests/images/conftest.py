"""A real Docker registry (Debian's ``docker-registry``) on 127.0.0.1, and images the tests build themselves.

The registry and the umoci-built busybox images come from tests/_registry.py (shared with the template
benchmark). Hand-made layers (opaque directories, malicious members) are written here as a raw OCI layout and
pushed the same way.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from _registry import MISSING, REGISTRY_BIN, Registry, build_busybox, start_registry

__all__ = ["Registry", "_build_busybox", "member", "tar_bytes", "write_layout"]


def _start(tmp: Path, *, htpasswd: Path | None = None) -> Iterator[Registry]:
    if shutil.which(REGISTRY_BIN) is None:
        pytest.fail(MISSING)
    with start_registry(tmp, htpasswd=htpasswd) as registry:
        yield registry


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


@pytest.fixture(scope="session")
def busybox_image(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Two layers: a busybox root, then a layer that deletes /etc/gone (whiteout), adds a hard link, and
    replaces /opt/old's contents. Config: env, workdir, cmd."""
    return _build_busybox(registry, tmp_path_factory.mktemp("bb-image"), "test/busybox:1")


_build_busybox = build_busybox  # the name the tests import


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
