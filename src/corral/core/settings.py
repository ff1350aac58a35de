"""One frozen Settings object, loaded once at start-up and passed down (DESIGN §6).

Precedence: defaults < ``CORRAL_*`` environment variables < explicit arguments. Nothing else in Corral reads
the environment after start-up.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from corral.errors import InvalidRequest
from corral.runtimes.base import Limits

__all__ = ["Settings"]

_DOMAIN = re.compile(r"(?=.{1,253}(:|$))[a-z0-9]([a-z0-9.-]*[a-z0-9])?(:[0-9]{1,5})?", re.IGNORECASE)


def _default_data_dir() -> Path:
    xdg = os.environ.get("XDG_DATA_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "share") / "corral"


@dataclass(frozen=True, kw_only=True)
class Settings:
    data_dir: Path = field(default_factory=_default_data_dir)
    default_isolation: str = "gvisor"  # the stronger boundary is the default; namespace is opt-in for speed
    default_template: str = "base"
    default_timeout: float = 300.0  # seconds a sandbox lives unless told otherwise (E2B's default too)
    max_timeout: float = 24 * 3600.0
    default_limits: Limits = field(default_factory=Limits)
    max_file_bytes: int = 4 * 1024**3  # largest single upload accepted
    enabled_runtimes: tuple[str, ...] = ("namespace", "gvisor")
    reap_interval: float = 5.0  # seconds between reconcile passes when no deadline is sooner
    database_url: str | None = None  # postgresql://… for a server that must not lose state; None = SQLite
    # server (corral serve)
    host: str = "127.0.0.1"  # loopback unless told otherwise: exposing the API is a deliberate choice
    port: int = 8700
    admin_key: str | None = None  # CORRAL_ADMIN_KEY: a bootstrap admin token accepted besides stored keys
    # CORRAL_SANDBOX_DOMAIN: sandbox ports are served at {port}-{sandbox_id}.{domain} (wildcard DNS to the
    # server); None: localhost:{port}, since browsers and curl resolve *.localhost to the loopback address
    sandbox_domain: str | None = None
    max_request_bytes: int = 1024 * 1024  # JSON bodies; file uploads stream and are bounded by max_file_bytes
    # warm pools (core/pools.py)
    max_pool_size: int = 64  # members one pool may keep
    pool_interval: float = 5.0  # seconds between pool reconcile passes when nothing wakes them sooner
    pool_start_concurrency: int = 2  # members booting at once: a boot is CPU-bound (2 cores here)
    pool_member_max_age: float = 6 * 3600.0  # safety deadline of unclaimed members; replaced before it

    @property
    def ports_domain(self) -> str:
        """Where the port proxy serves sandbox ports: ``{port}-{sandbox_id}.{ports_domain}``."""
        return self.sandbox_domain or f"localhost:{self.port}"

    @property
    def state_root(self) -> Path:
        return self.data_dir / "sandboxes"

    @property
    def cache_root(self) -> Path:
        return self.data_dir / "cache"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "corral.db"

    @classmethod
    def load(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        if env.get("CORRAL_DATA_DIR"):
            values["data_dir"] = Path(env["CORRAL_DATA_DIR"])
        if env.get("CORRAL_ISOLATION"):
            values["default_isolation"] = env["CORRAL_ISOLATION"]
        if env.get("CORRAL_DATABASE_URL"):
            values["database_url"] = env["CORRAL_DATABASE_URL"]
        if env.get("CORRAL_HOST"):
            values["host"] = env["CORRAL_HOST"]
        if env.get("CORRAL_PORT"):
            try:
                values["port"] = int(env["CORRAL_PORT"])
            except ValueError as exc:
                raise InvalidRequest(
                    f"CORRAL_PORT must be a port number, got {env['CORRAL_PORT']!r}"
                ) from exc
        if env.get("CORRAL_ADMIN_KEY"):
            values["admin_key"] = env["CORRAL_ADMIN_KEY"]
        if env.get("CORRAL_SANDBOX_DOMAIN"):
            values["sandbox_domain"] = env["CORRAL_SANDBOX_DOMAIN"]
        if env.get("CORRAL_RUNTIMES"):
            values["enabled_runtimes"] = tuple(
                x.strip() for x in env["CORRAL_RUNTIMES"].split(",") if x.strip()
            )
        for key, name in (
            ("default_timeout", "CORRAL_DEFAULT_TIMEOUT"),
            ("max_timeout", "CORRAL_MAX_TIMEOUT"),
        ):
            if env.get(name):
                try:
                    values[key] = float(env[name])
                except ValueError as exc:
                    raise InvalidRequest(f"{name} must be a number of seconds, got {env[name]!r}") from exc
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        if settings.sandbox_domain is not None and not _DOMAIN.fullmatch(settings.sandbox_domain):
            raise InvalidRequest(
                f"CORRAL_SANDBOX_DOMAIN must be a host name with an optional port, like sandbox.example.com "
                f"or localhost:8700 (no scheme, no path), got {settings.sandbox_domain!r}"
            )
        return replace(settings, data_dir=settings.data_dir.expanduser().absolute())
