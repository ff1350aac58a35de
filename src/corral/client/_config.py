"""The SDK's own small configuration: where the server is, and how to authenticate (DESIGN §6).

Read once, when a Sandbox or client is created without an explicit backend.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["ClientConfig"]


@dataclass(frozen=True, kw_only=True)
class ClientConfig:
    url: str | None = None  # CORRAL_URL: a Corral server; unset = embedded mode on this host
    api_key: str | None = None  # CORRAL_API_KEY

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ClientConfig:
        env = os.environ if env is None else env
        return cls(url=env.get("CORRAL_URL") or None, api_key=env.get("CORRAL_API_KEY") or None)
