"""Secrets of sandboxes on the service side: the per-sandbox CA, sealing at rest, the sandbox's trust store.

See :mod:`corral.secrets` for what a secret is and :mod:`corral.runtimes._net.intercept` for where it is
substituted. Decisions kept here:

- values are sealed with Fernet (AES-128-CBC + HMAC-SHA256, ``cryptography``) under the server's key file
  (``Settings.secrets_key_file``, made 0600 on first use) before they reach the store; records, API answers
  and audit entries carry secret *names* only;
- the CA (P-256, name-constrained to the bound hosts) is made per sandbox; its key goes to the runtime in
  memory and from there to the egress process over a pipe, and is in no record and no file;
- a snapshot, template or fork of a sandbox carries no secrets: the new sandbox gets those given to its own
  create (with new placeholders and a new CA) or none, so an old placeholder resolves to nothing.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from corral.core import files as _files
from corral.core.agent_client import AgentClient
from corral.core.pki import new_ca
from corral.errors import InvalidRequest, NotFound
from corral.netpolicy import NetworkPolicy
from corral.secrets import CA_BUNDLE_PATH, CA_PATH, SecretBinding, parse_secrets, trust_env

__all__ = ["EgressSecrets", "Sealer", "bind", "install_trust", "make_ca", "sandbox_env"]

CA_DAYS = 400  # longer than any sandbox lives


@dataclass(frozen=True, kw_only=True)
class EgressSecrets:
    """What the egress process of one sandbox gets (over a pipe, never a file): the CA and the bindings."""

    ca_cert: str
    ca_key: str = field(repr=False)
    bindings: tuple[SecretBinding, ...]

    @classmethod
    def make(cls, sandbox_id: str, bindings: tuple[SecretBinding, ...]) -> EgressSecrets:
        cert, key = make_ca(sandbox_id, sorted({h for b in bindings for h in b.hosts}))
        return cls(ca_cert=cert, ca_key=key, bindings=bindings)

    def to_wire(self) -> dict[str, Any]:
        return {
            "ca_cert": self.ca_cert,
            "ca_key": self.ca_key,
            "secrets": [b.to_wire() for b in self.bindings],
        }


def make_ca(sandbox_id: str, hosts: list[str]) -> tuple[str, str]:
    """A CA for one sandbox (P-256), name-constrained to the bound hosts: even inside the sandbox it can
    vouch for nothing else. Returns (certificate PEM, private key PEM)."""
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Corral egress"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"Corral egress CA {sandbox_id}"),
        ]
    )
    cert, key = new_ca(
        name,
        now=datetime.datetime.now(datetime.UTC),
        days=CA_DAYS,
        backdate=datetime.timedelta(hours=1),
        permitted=[h[2:] if h.startswith("*.") else h for h in hosts],
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode(), key_pem.decode()


class Sealer:
    """Secret values at rest: Fernet (AES-128-CBC + HMAC-SHA256) under the server's key file."""

    def __init__(self, key: bytes) -> None:
        self._fernet = Fernet(key)

    @classmethod
    def from_file(cls, path: Path) -> Sealer:
        """The key in ``path``, made (0600, exclusively) on first use."""
        try:
            return cls(path.read_bytes().strip())
        except FileNotFoundError:
            pass
        except ValueError as exc:
            raise InvalidRequest(f"the secrets key file {path.name} is not a Fernet key") from exc
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = Fernet.generate_key()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:  # another process made it first
            return cls(path.read_bytes().strip())
        with os.fdopen(fd, "wb") as f:
            f.write(key + b"\n")
        return cls(key)

    def seal(self, bindings: tuple[SecretBinding, ...]) -> str:
        return self._fernet.encrypt(json.dumps([b.to_wire() for b in bindings]).encode()).decode()

    def open(self, token: str) -> tuple[SecretBinding, ...]:
        try:
            data = json.loads(self._fernet.decrypt(token.encode()))
        except InvalidToken as exc:
            raise InvalidRequest("stored secrets cannot be opened with this server's secrets key") from exc
        return tuple(SecretBinding.from_wire(d) for d in data)


async def install_trust(client: AgentClient, ca_cert: str, *, max_bytes: int) -> None:
    """Make the sandbox trust its egress CA: the system bundle in its writable layer gets the CA appended,
    and the CA alone is kept at ``CA_PATH`` (``NODE_EXTRA_CA_CERTS``); see :func:`corral.secrets.trust_env`."""
    bundle = b""
    with contextlib.suppress(NotFound):
        async for chunk in _files.read(client, CA_BUNDLE_PATH, user="root"):
            bundle += chunk
    if bundle and not bundle.endswith(b"\n"):
        bundle += b"\n"
    pem = ca_cert.encode()
    for path, data in ((CA_BUNDLE_PATH, bundle + pem), (CA_PATH, pem)):
        await _files.write(client, path, _one(data), max_bytes=max_bytes, user="root", mode=0o644)


async def _one(data: bytes) -> AsyncIterator[bytes]:
    yield data


def bind(value: object, policy: NetworkPolicy, env: dict[str, str]) -> tuple[SecretBinding, ...]:
    """A create's secrets, bound and with placeholders; a secret's name may not also be a plain env var."""
    bindings = parse_secrets(value, policy)
    clash = sorted({b.name for b in bindings} & set(env))
    if clash:
        raise InvalidRequest(
            f"{clash[0]} is both a secret and an env variable; give it once", details={"name": clash[0]}
        )
    return bindings


def sandbox_env(env: dict[str, str], bindings: tuple[SecretBinding, ...]) -> dict[str, str]:
    """The env the sandbox's processes get: the caller's, the placeholders, and the CA trust variables."""
    if not bindings:
        return env
    return {**trust_env(), **env, **{b.name: b.placeholder for b in bindings}}
