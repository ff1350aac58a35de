"""Pulling OCI/Docker images from a registry (Docker Registry HTTP API v2) into a shared local OCI layout.

Why skopeo rather than our own httpx client: the registry protocol has many corners that a well-kept tool
already gets right (the bearer-token dance from ``WWW-Authenticate``, basic auth, multi-arch indexes and
platform choice, Docker schema 2 → OCI manifest conversion, digest verification of every blob, retries,
mirrors). ``skopeo copy docker://REF oci:LAYOUT:NAME`` writes blobs into ``LAYOUT/blobs/sha256/<hex>`` and
skips any blob already there, so one layout shared by every pull *is* a digest-keyed blob cache: a second pull
of an image, or of another image sharing its base layers, downloads only the manifest and what is new.

Credentials never go on a command line (other host users can read it): username/password are written to a
private, temporary ``auth.json`` passed as ``--src-authfile``. A registry bearer token (``--src-registry-token``)
is the exception skopeo forces; prefer username/password where the registry offers both.

Plain ``http://`` is allowed for loopback registries (``127.0.0.1``, ``localhost``, ``[::1]``; as with docker,
they may speak HTTP without saying ``http://``) or with an explicit ``insecure=True``: anything else must be
HTTPS with a verified certificate.

Pulls into the layout are serialised by a lock file (skopeo rewrites ``index.json``). Errors are classified
from skopeo's stderr into Corral's typed errors; the raw text (it names host paths) goes to the log only.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corral.errors import InvalidRequest, NotFound, PermissionDenied, RuntimeFailure, Timeout, Unsupported
from corral.runtimes import _proc

__all__ = ["Credentials", "ImageConfig", "ImageRef", "LayerBlob", "PulledImage", "pull"]

log = logging.getLogger("corral.images.registry")

PULL_TIMEOUT = 1800.0  # a multi-GiB image over a slow link; skopeo itself retries individual requests
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "[::1]", "::1"})
_REF = re.compile(
    r"^(?:(?P<scheme>https?)://)?"
    r"(?:(?P<host>[a-zA-Z0-9.-]+(?::[0-9]+)?|\[[0-9a-fA-F:]+\](?::[0-9]+)?)/)?"
    r"(?P<repo>[a-z0-9]+(?:[._/-][a-z0-9]+)*)"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?"
    r"(?:@(?P<digest>sha256:[0-9a-f]{64}))?$"
)
_LAYER_TYPES = {
    "application/vnd.oci.image.layer.v1.tar": "tar",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
}


@dataclass(frozen=True, kw_only=True)
class Credentials:
    """How to log in to a registry: username + password (basic, or exchanged for a bearer token by the
    registry's token service), or a ready bearer ``token``. Never logged, never stored."""

    username: str | None = None
    password: str | None = None
    token: str | None = None

    def __repr__(self) -> str:
        return f"Credentials(username={self.username!r}, password=***, token={'***' if self.token else None})"


@dataclass(frozen=True, kw_only=True)
class ImageRef:
    """``[http[s]://][HOST[:PORT]/]REPO[:TAG][@sha256:…]``; no host means Docker Hub, as with docker."""

    host: str
    repo: str
    tag: str | None
    digest: str | None
    plain_http: bool

    @classmethod
    def parse(cls, text: str) -> ImageRef:
        m = _REF.match(text.strip()) if isinstance(text, str) else None
        if m is None:
            raise InvalidRequest(
                f"{text!r} is not an image reference; write it like registry.example.com/team/image:tag "
                "or 127.0.0.1:5000/image@sha256:…"
            )
        host = m["host"] or "docker.io"
        repo = m["repo"]
        if host == "docker.io" and "/" not in repo:
            repo = f"library/{repo}"
        tag = m["tag"] or (None if m["digest"] else "latest")
        return cls(host=host, repo=repo, tag=tag, digest=m["digest"], plain_http=m["scheme"] == "http")

    @property
    def loopback(self) -> bool:
        return self.host.rsplit(":", 1)[0] in _LOOPBACK or self.host.startswith("[::1]")

    def __str__(self) -> str:
        return (
            f"{self.host}/{self.repo}"
            + (f":{self.tag}" if self.tag else "")
            + (f"@{self.digest}" if self.digest else "")
        )


@dataclass(frozen=True, kw_only=True)
class ImageConfig:
    """What an image says about how to run it (the ``config`` object of the OCI image config)."""

    env: dict[str, str] = field(default_factory=dict)
    workdir: str | None = None
    user: str | None = None
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()

    @classmethod
    def from_oci(cls, data: dict[str, Any]) -> ImageConfig:
        config = data.get("config") or {}
        env: dict[str, str] = {}
        for item in config.get("Env") or ():
            key, sep, value = str(item).partition("=")
            if sep and key:
                env[key] = value
        return cls(
            env=env,
            workdir=config.get("WorkingDir") or None,
            user=config.get("User") or None,
            entrypoint=tuple(str(a) for a in config.get("Entrypoint") or ()),
            cmd=tuple(str(a) for a in config.get("Cmd") or ()),
        )


@dataclass(frozen=True, kw_only=True)
class LayerBlob:
    digest: str  # "sha256:<hex>" of the blob as stored (compressed)
    path: Path  # the blob in the shared layout
    compression: str  # "tar", "gzip"
    size: int


@dataclass(frozen=True, kw_only=True)
class PulledImage:
    ref: ImageRef
    manifest_digest: str
    layers: tuple[LayerBlob, ...]  # bottom-most first, as in the manifest
    config: ImageConfig


def _authfile(dirname: Path, ref: ImageRef, creds: Credentials) -> Path:
    auth = base64.b64encode(f"{creds.username}:{creds.password or ''}".encode()).decode()
    path = dirname / "auth.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"auths": {ref.host: {"auth": auth}}}, f)
    return path


@contextlib.contextmanager
def _locked(layout: Path) -> Iterator[None]:
    layout.mkdir(parents=True, exist_ok=True)
    with open(layout.parent / f".{layout.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def pull(
    ref: ImageRef, layout: Path, *, credentials: Credentials | None = None, insecure: bool = False
) -> PulledImage:
    """Copy ``ref`` into the OCI layout ``layout`` (blocking: run it in a worker thread).

    Blobs already in the layout are not downloaded again. Raises NotFound (no such image or tag),
    PermissionDenied (the registry wants other credentials), InvalidRequest (plain HTTP to a remote host,
    unreachable registry), Unsupported (zstd layers), Timeout.
    """
    if ref.plain_http and not (ref.loopback or insecure):
        raise InvalidRequest(
            f"refusing plain http:// to {ref.host}: only loopback registries may skip TLS, unless you pass "
            "insecure=True (--insecure-registry)"
        )
    skopeo = _proc.require_binary("skopeo")
    name = hashlib.sha256(str(ref).encode()).hexdigest()[:32]
    with tempfile.TemporaryDirectory(prefix="corral-pull-") as private, _locked(layout):
        os.chmod(private, 0o700)
        argv = [skopeo, "--insecure-policy", "copy", "--quiet", "--retry-times", "2"]
        if credentials is not None and credentials.token:
            argv += ["--src-registry-token", credentials.token]
        elif credentials is not None and credentials.username:
            argv += ["--src-authfile", str(_authfile(Path(private), ref, credentials))]
        else:
            argv += ["--src-no-creds"]
        if ref.plain_http or insecure or ref.loopback:  # loopback: docker's default insecure range too
            argv += ["--src-tls-verify=false"]
        # HOME/XDG point at the private dir: no host docker/containers config or credentials leak in
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": private, "XDG_RUNTIME_DIR": private}
        argv += [f"docker://{ref}", f"oci:{layout}:{name}"]
        result = _proc.run_blocking(argv, timeout=PULL_TIMEOUT, what=f"pull {ref}", check=False, env=env)
        if result.returncode != 0:
            raise _classify(ref, result.stderr.decode(errors="replace"))
        return _read_layout(ref, layout, name)


def _classify(ref: ImageRef, stderr: str) -> Exception:
    log.error("skopeo copy %s failed:\n%s", ref, stderr[-4000:])
    text = stderr.lower()
    if "manifest unknown" in text or "name unknown" in text or ("not found" in text and "manifest" in text):
        return NotFound(f"image {ref} was not found in the registry {ref.host}: check the name and tag")
    if any(s in text for s in ("unauthorized", "authentication required", "denied", "invalid username")):
        return PermissionDenied(
            f"the registry {ref.host} refused access to {ref.repo}: give valid credentials "
            "(--registry-user/--registry-password or CORRAL_REGISTRY_USER/CORRAL_REGISTRY_PASSWORD)"
        )
    if "timeout" in text or "deadline exceeded" in text:
        return Timeout(f"the registry {ref.host} did not answer in time")
    if any(s in text for s in ("connection refused", "no such host", "network is unreachable", "no route")):
        return InvalidRequest(f"cannot reach the registry {ref.host}: check the address and that it is up")
    if "http response to https client" in text:
        return InvalidRequest(
            f"the registry {ref.host} speaks plain HTTP; write http://{ref} (allowed for loopback registries) "
            "or pass insecure=True"
        )
    return RuntimeFailure(f"could not pull {ref} from {ref.host}")


def _read_json(layout: Path, digest: str) -> dict[str, Any]:
    algo, _, hexd = digest.partition(":")
    if algo != "sha256" or not re.fullmatch(r"[0-9a-f]{64}", hexd):
        raise RuntimeFailure("the pulled image has a malformed digest")
    data = json.loads((layout / "blobs" / "sha256" / hexd).read_bytes())
    if not isinstance(data, dict):
        raise RuntimeFailure("the pulled image has a malformed manifest")
    return data


def _read_layout(ref: ImageRef, layout: Path, name: str) -> PulledImage:
    index = json.loads((layout / "index.json").read_text())
    entry = next(
        (
            m
            for m in index.get("manifests", ())
            if (m.get("annotations") or {}).get("org.opencontainers.image.ref.name") == name
        ),
        None,
    )
    if entry is None:
        raise RuntimeFailure(f"could not pull {ref}: the image did not arrive")
    manifest = _read_json(layout, entry["digest"])
    config = _read_json(layout, manifest["config"]["digest"])
    layers = []
    for layer in manifest.get("layers", ()):
        kind = _LAYER_TYPES.get(layer.get("mediaType", ""))
        if kind is None or kind == "zstd":
            raise Unsupported(f"image {ref} has a layer of type {layer.get('mediaType')!r}, not supported")
        digest = str(layer["digest"])
        _read_digest_ok = re.fullmatch(r"sha256:[0-9a-f]{64}", digest)
        if not _read_digest_ok:
            raise RuntimeFailure("the pulled image has a malformed layer digest")
        layers.append(
            LayerBlob(
                digest=digest,
                path=layout / "blobs" / "sha256" / digest[7:],
                compression=kind,
                size=int(layer.get("size", 0)),
            )
        )
    return PulledImage(
        ref=ref, manifest_digest=entry["digest"], layers=tuple(layers), config=ImageConfig.from_oci(config)
    )
