"""Tenants, API keys and quotas.

- A **tenant** owns sandboxes; every service call carries the tenant it acts for, and the store filters by it,
  so one tenant can never see or touch another's sandboxes (the server turns "not yours" into 404, never 403,
  so ids of other tenants cannot be probed).
- An **API key** is ``corral_<key id>_<secret>``. Only the SHA-256 of the secret is stored: the secret is 256
  random bits, so a slow password hash would add latency to every request without adding safety. The key id in
  the clear lets us find the row in one lookup; the hash is compared in constant time.
- The same key can also be written in **E2B's form**, ``e2b_<hex>``, for E2B's SDK (some versions refuse any
  other shape client-side): 20 hex digits are the key id's 80 bits, the next 64 the secret. ``create_key(e2b=True)``
  makes one. It is an ordinary tenant key either way: same table, quotas, audit and isolation.
- An **admin key** belongs to no tenant. It manages tenants and keys and reads the audit log; it cannot run
  sandboxes (so a leaked tenant key cannot become admin, and an admin action is never confused with a tenant's).
- **Quotas** are per tenant: concurrent live sandboxes, total memory of live sandboxes, maximum timeout.
  ``None`` means unlimited. They are checked by the service at create time (and max timeout on set_timeout).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from corral.errors import Conflict, InvalidRequest, NotFound, ResourceExhausted, Unauthenticated
from corral.ids import KeyId, TenantId

__all__ = [
    "ApiKeyRecord",
    "AuthService",
    "AuthStore",
    "NewKey",
    "Principal",
    "Quotas",
    "TenantRecord",
    "check_quota",
]

KEY_PREFIX = "corral_"
E2B_KEY_PREFIX = "e2b_"
_E2B_KEY = re.compile(r"e2b_([0-9a-f]{20})([0-9a-f]{64})")
_TENANT_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


@dataclass(frozen=True, kw_only=True)
class Quotas:
    max_sandboxes: int | None = None  # live (creating, running or paused) sandboxes at once
    max_memory_mb: int | None = None  # sum of the memory limits of live sandboxes
    max_timeout: float | None = None  # longest lifetime one create or set_timeout may ask for

    def __post_init__(self) -> None:
        for name in ("max_sandboxes", "max_memory_mb", "max_timeout"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int | float) or value <= 0
            ):
                raise InvalidRequest(f"quota {name} must be a positive number or unset (unlimited)")

    def to_wire(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, kw_only=True)
class TenantRecord:
    tenant_id: TenantId
    name: str
    created_at: float
    quotas: Quotas = field(default_factory=Quotas)
    version: int = 0

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TenantRecord:
        data = json.loads(text)
        return cls(
            tenant_id=TenantId(data["tenant_id"]),
            name=data["name"],
            created_at=data["created_at"],
            quotas=Quotas(**data["quotas"]),
            version=data.get("version", 0),
        )

    def to_wire(self) -> dict[str, Any]:
        return {
            "tenant_id": str(self.tenant_id),
            "name": self.name,
            "created_at": self.created_at,
            "quotas": self.quotas.to_wire(),
        }


@dataclass(frozen=True, kw_only=True)
class ApiKeyRecord:
    key_id: KeyId
    tenant_id: TenantId | None  # None: an admin key
    secret_sha256: str
    created_at: float
    name: str = ""
    revoked_at: float | None = None

    @property
    def admin(self) -> bool:
        return self.tenant_id is None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ApiKeyRecord:
        data = json.loads(text)
        data["key_id"] = KeyId(data["key_id"])
        data["tenant_id"] = TenantId(data["tenant_id"]) if data.get("tenant_id") else None
        return cls(**data)

    def to_wire(self) -> dict[str, Any]:
        """Everything but the hash."""
        return {
            "key_id": str(self.key_id),
            "tenant_id": self.tenant_id and str(self.tenant_id),
            "admin": self.admin,
            "name": self.name,
            "created_at": self.created_at,
            "revoked_at": self.revoked_at,
        }


@dataclass(frozen=True, kw_only=True)
class Principal:
    """Who a request acts as, once its key is checked."""

    key_id: KeyId
    tenant_id: TenantId | None

    @property
    def admin(self) -> bool:
        return self.tenant_id is None


@dataclass(frozen=True, kw_only=True)
class NewKey:
    """A freshly made key: ``token`` is shown once and never stored."""

    record: ApiKeyRecord
    token: str


class AuthStore(Protocol):
    async def get_tenant(self, tenant_id: TenantId) -> TenantRecord | None: ...

    async def get_tenant_by_name(self, name: str) -> TenantRecord | None: ...

    async def put_tenant(self, record: TenantRecord, *, expect_version: int | None) -> TenantRecord:
        """Compare-and-swap like sandboxes; a second tenant with the same name raises Conflict."""

    async def list_tenants(self) -> list[TenantRecord]: ...

    async def get_key(self, key_id: KeyId) -> ApiKeyRecord | None: ...

    async def put_key(self, record: ApiKeyRecord) -> None:
        """Insert a new key or overwrite one (revocation)."""

    async def list_keys(self, *, tenant_id: TenantId | None = None) -> list[ApiKeyRecord]: ...


def _sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _e2b_token(key_id: KeyId, secret: str) -> str:
    raw = base64.b32decode(key_id.removeprefix("key-").upper())  # 16 base32 digits: exactly 10 bytes
    return f"{E2B_KEY_PREFIX}{raw.hex()}{secret}"


def parse_token(token: str) -> tuple[KeyId, str]:
    """Split ``corral_<key id>_<secret>`` or ``e2b_<hex key id><hex secret>``; Unauthenticated for anything else."""
    if isinstance(token, str) and token.startswith(E2B_KEY_PREFIX):
        match = _E2B_KEY.fullmatch(token)
        if match is None:
            raise Unauthenticated("the API key is malformed; E2B-style keys are e2b_ and 84 hex digits")
        key_id = "key-" + base64.b32encode(bytes.fromhex(match[1])).decode().lower()
        return KeyId(key_id), match[2]
    if not isinstance(token, str) or not token.startswith(KEY_PREFIX):
        raise Unauthenticated(
            "the API key is malformed; keys look like corral_key-…_… (or e2b_… for E2B's SDK)"
        )
    key_id, sep, secret = token[len(KEY_PREFIX) :].partition("_")
    if not sep or not secret or not KeyId.is_valid(key_id):
        raise Unauthenticated(
            "the API key is malformed; keys look like corral_key-…_… (or e2b_… for E2B's SDK)"
        )
    return KeyId(key_id), secret


class AuthService:
    def __init__(self, store: AuthStore, *, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self._clock = clock

    async def create_tenant(self, name: str, *, quotas: Quotas | None = None) -> TenantRecord:
        if not isinstance(name, str) or not _TENANT_NAME.fullmatch(name):
            raise InvalidRequest(
                "a tenant name is 1-63 characters of a-z, 0-9 and '-', starting with a letter or digit"
            )
        if await self.store.get_tenant_by_name(name) is not None:
            raise Conflict(f"tenant {name!r} already exists")
        return await self.store.put_tenant(
            TenantRecord(
                tenant_id=TenantId.new(), name=name, created_at=self._clock(), quotas=quotas or Quotas()
            ),
            expect_version=None,
        )

    async def tenant(self, name_or_id: str) -> TenantRecord:
        record = (
            await self.store.get_tenant(TenantId(name_or_id))
            if TenantId.is_valid(name_or_id)
            else await self.store.get_tenant_by_name(name_or_id)
        )
        if record is None:
            raise NotFound(f"no tenant {name_or_id!r}; create it with `corral tenants create NAME`")
        return record

    async def set_quotas(self, name_or_id: str, quotas: Quotas) -> TenantRecord:
        record = await self.tenant(name_or_id)
        return await self.store.put_tenant(
            dataclasses.replace(record, quotas=quotas), expect_version=record.version
        )

    async def create_key(self, *, tenant: str | None, name: str = "", e2b: bool = False) -> NewKey:
        """A key for tenant ``tenant`` (name or id), or an admin key when ``tenant`` is None.

        ``e2b``: the key is written in E2B's ``e2b_<hex>`` form (for E2B's SDK); it works like any other.
        """
        if not isinstance(name, str) or len(name) > 128:
            raise InvalidRequest("a key name is a string of at most 128 characters")
        if e2b and tenant is None:
            raise InvalidRequest("E2B-style keys are tenant keys: E2B's SDK has no use for an admin key")
        tenant_id = (await self.tenant(tenant)).tenant_id if tenant is not None else None
        secret = secrets.token_hex(32) if e2b else secrets.token_urlsafe(32)
        record = ApiKeyRecord(
            key_id=KeyId.new(),
            tenant_id=tenant_id,
            secret_sha256=_sha256(secret),
            created_at=self._clock(),
            name=name,
        )
        await self.store.put_key(record)
        token = _e2b_token(record.key_id, secret) if e2b else f"{KEY_PREFIX}{record.key_id}_{secret}"
        return NewKey(record=record, token=token)

    async def revoke_key(self, key_id: str) -> ApiKeyRecord:
        record = await self.store.get_key(KeyId(key_id))
        if record is None:
            raise NotFound(f"no API key {key_id}")
        if record.revoked_at is None:
            record = dataclasses.replace(record, revoked_at=self._clock())
            await self.store.put_key(record)
        return record

    async def authenticate(self, token: str | None) -> Principal:
        if not token:
            raise Unauthenticated(
                "this server needs an API key: send it as 'Authorization: Bearer <key>' or 'X-API-Key' "
                "(the SDK and CLI read CORRAL_API_KEY)"
            )
        key_id, secret = parse_token(token)
        record = await self.store.get_key(key_id)
        # Compare even when the key is unknown, so timing says nothing about which key ids exist.
        expected = record.secret_sha256 if record else _sha256("")
        if not hmac.compare_digest(expected, _sha256(secret)) or record is None:
            raise Unauthenticated("the API key is not valid")
        if record.revoked_at is not None:
            raise Unauthenticated("the API key was revoked; ask an admin for a new one")
        return Principal(key_id=record.key_id, tenant_id=record.tenant_id)


def check_quota(
    quotas: Quotas, *, live_count: int, live_memory_mb: int, memory_mb: int, timeout: float, tenant: str
) -> None:
    """Raise ResourceExhausted (429) naming the limit a new sandbox would break."""
    if quotas.max_sandboxes is not None and live_count + 1 > quotas.max_sandboxes:
        raise ResourceExhausted(
            f"tenant {tenant} has {live_count} live sandboxes, its limit (max_sandboxes) is "
            f"{quotas.max_sandboxes}; kill one first",
            details={"limit": "max_sandboxes", "value": quotas.max_sandboxes},
        )
    if quotas.max_memory_mb is not None and live_memory_mb + memory_mb > quotas.max_memory_mb:
        raise ResourceExhausted(
            f"tenant {tenant} would use {live_memory_mb + memory_mb} MiB of memory, its limit "
            f"(max_memory_mb) is {quotas.max_memory_mb}; ask for less memory or kill a sandbox",
            details={"limit": "max_memory_mb", "value": quotas.max_memory_mb},
        )
    check_timeout_quota(quotas, timeout, tenant=tenant)


def check_timeout_quota(quotas: Quotas, timeout: float, *, tenant: str) -> None:
    if quotas.max_timeout is not None and timeout > quotas.max_timeout:
        raise ResourceExhausted(
            f"a timeout of {timeout:g} s is over tenant {tenant}'s limit (max_timeout) of "
            f"{quotas.max_timeout:g} s",
            details={"limit": "max_timeout", "value": quotas.max_timeout},
        )
