"""Typed, prefixed identifiers.

A sandbox id (``sb-…``) is never confused with a template name or a runsc container id: each id kind is its own
``str`` subclass with a fixed prefix, validated on construction. Random parts are fixed-length lowercase base32
so they are safe in file names, cgroup names, DNS labels (``{port}-{sandbox_id}.{domain}``) and runsc ids (runsc
matches container ids by prefix, so every id must have the same length).
"""

from __future__ import annotations

import base64
import re
import secrets
from typing import ClassVar, Self

from corral.errors import InvalidRequest

__all__ = [
    "KeyId",
    "PoolId",
    "ProcessId",
    "SandboxId",
    "TenantId",
    "new_envd_access_token",
    "new_request_id",
    "new_traffic_token",
]

_RANDOM_LEN = 16  # 80 bits of randomness: collisions are not a practical concern at any fleet size


def _random_part() -> str:
    return base64.b32encode(secrets.token_bytes(10)).decode().lower()[:_RANDOM_LEN]


class _PrefixedId(str):
    prefix: ClassVar[str]
    _pattern: ClassVar[re.Pattern[str]]

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        cls._pattern = re.compile(rf"{re.escape(cls.prefix)}[a-z2-7]{{{_RANDOM_LEN}}}")

    def __new__(cls, value: str) -> Self:
        if not isinstance(value, str) or not cls._pattern.fullmatch(value):
            raise InvalidRequest(
                f"{value!r} is not a valid {cls.__name__} (expected {cls.prefix} followed by "
                f"{_RANDOM_LEN} characters a-z/2-7)"
            )
        return super().__new__(cls, value)

    @classmethod
    def new(cls) -> Self:
        return cls(cls.prefix + _random_part())

    @classmethod
    def is_valid(cls, value: object) -> bool:
        return isinstance(value, str) and bool(cls._pattern.fullmatch(value))


class SandboxId(_PrefixedId):
    prefix = "sb-"


class TenantId(_PrefixedId):
    prefix = "tn-"


class KeyId(_PrefixedId):
    prefix = "key-"


class ProcessId(_PrefixedId):
    """Handle of a process inside a sandbox, stable across re-attach (the OS pid is reported separately)."""

    prefix = "p-"


class PoolId(_PrefixedId):
    """One generation of a warm pool: a pool re-made with other limits gets a new id, orphaning old members."""

    prefix = "pool-"


def new_request_id() -> str:
    """Id of one agent-protocol request; unique per connection is enough."""
    return secrets.token_hex(6)


def new_traffic_token() -> str:
    """A sandbox's port-proxy credential: 256 random bits, URL-safe (it travels in a header)."""
    return secrets.token_urlsafe(32)


def new_envd_access_token() -> str:
    """A sandbox's in-sandbox API credential (E2B's ``envdAccessToken``): 256 random bits, URL-safe."""
    return secrets.token_urlsafe(32)
