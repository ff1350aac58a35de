"""One frozen Settings object, loaded once at start-up and passed down (DESIGN §6).

Precedence: defaults < the TOML file < ``CORRAL_*`` environment variables < explicit arguments (CLI flags).
Nothing else in Corral reads the environment after start-up.

The file (``--config``, ``CORRAL_CONFIG``, or ``$XDG_CONFIG_HOME/corral/config.toml`` when it exists) is
grouped by what each setting is about; :data:`FILE_KEYS` maps each ``[group] key`` to its Settings field::

    data_dir = "/var/lib/corral"
    [server]  host, port, admin_key, sandbox_domain, max_request_bytes, tls_cert, tls_key, http2
    [e2b]     domain                                     (E2B's SDK with E2B_DOMAIN alone: api.{domain} and
                                                          {port}-{sandbox_id}.{domain}, wildcard DNS + TLS)
    [store]   database_url
    [sandbox] default_template, default_timeout, max_timeout, max_file_bytes, metrics_interval
    [limits]  memory_mb, cpus, pids, disk_mb                 (the default limits of a sandbox)
    [pools]   max_size, interval, start_concurrency, member_max_age
    [runtime] default, enabled, node, reap_interval
    [network] uplink_netns, resolvers, denied_ranges, subnet, max_connections, bandwidth_bytes,
              upstream_ca_file                                (sandbox egress: where it leaves, and its caps)
    [secrets] key_file                                        (the key sandbox secrets are sealed with)
    [runtime.gvisor]    platform = "systrap"               (one table per runtime: its own options)
    [e2b]     internet_by_default                             (the E2B adapter: see the field's comment)

A runtime's table is checked against the options that runtime declares when the runtime is first loaded
(:func:`corral.runtimes.registry.parse_options`); ``CORRAL_RUNTIME_<NAME>_<OPTION>`` sets one option.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from corral.errors import InvalidRequest
from corral.runtimes._net.config import EgressConfig
from corral.runtimes.base import Limits

__all__ = ["FILE_KEYS", "Settings", "valid_domain"]

_DOMAIN = re.compile(r"(?=.{1,253}(:|$))[a-z0-9]([a-z0-9.-]*[a-z0-9])?(:[0-9]{1,5})?", re.IGNORECASE)


def valid_domain(domain: str) -> bool:
    """A host name with an optional port (no scheme, no path): what the domain settings take."""
    return _DOMAIN.fullmatch(domain) is not None


def _default_data_dir() -> Path:
    xdg = os.environ.get("XDG_DATA_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "share") / "corral"


def _default_config_file(env: Mapping[str, str]) -> Path:
    xdg = env.get("XDG_CONFIG_HOME")
    return (Path(xdg) if xdg else Path.home() / ".config") / "corral" / "config.toml"


def default_node(data_dir: Path) -> str:
    """This host's node id: its name plus a digest of its machine id and data dir, so two servers on one
    host with their own data dirs (whose sandboxes they cannot see) are two nodes, and a restart is the same."""
    try:
        machine = Path("/etc/machine-id").read_text().strip()
    except OSError:
        machine = ""
    digest = hashlib.sha256(f"{machine}\0{data_dir}".encode()).hexdigest()[:8]
    host = re.sub(r"[^a-z0-9.-]", "-", socket.gethostname().lower())[:48] or "host"
    return f"{host}-{digest}"


_NODE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9._:-]{0,62}")

# [group] key in the config file -> Settings field ("" = top level)
FILE_KEYS: dict[tuple[str, str], str] = {
    ("", "data_dir"): "data_dir",
    ("server", "host"): "host",
    ("server", "port"): "port",
    ("server", "admin_key"): "admin_key",
    ("server", "sandbox_domain"): "sandbox_domain",
    ("server", "max_request_bytes"): "max_request_bytes",
    ("server", "tls_cert"): "tls_cert",
    ("server", "tls_key"): "tls_key",
    ("server", "http2"): "http2",
    ("e2b", "domain"): "e2b_domain",
    ("store", "database_url"): "database_url",
    ("sandbox", "default_template"): "default_template",
    ("sandbox", "default_timeout"): "default_timeout",
    ("sandbox", "max_timeout"): "max_timeout",
    ("sandbox", "max_file_bytes"): "max_file_bytes",
    ("sandbox", "metrics_interval"): "metrics_interval",
    ("pools", "max_size"): "max_pool_size",
    ("pools", "interval"): "pool_interval",
    ("pools", "start_concurrency"): "pool_start_concurrency",
    ("pools", "member_max_age"): "pool_member_max_age",
    ("runtime", "default"): "default_isolation",
    ("runtime", "enabled"): "enabled_runtimes",
    ("runtime", "node"): "node",
    ("runtime", "reap_interval"): "reap_interval",
    ("e2b", "internet_by_default"): "e2b_internet_by_default",
    ("secrets", "key_file"): "secrets_key_file",
}
_LIMIT_KEYS = ("memory_mb", "cpus", "pids", "disk_mb")


@dataclass(frozen=True, kw_only=True)
class Settings:
    data_dir: Path = field(default_factory=_default_data_dir)
    default_isolation: str = "gvisor"  # the stronger boundary is the default; namespace is opt-in for speed
    default_template: str = "base"
    default_timeout: float = 300.0  # seconds a sandbox lives unless told otherwise (E2B's default too)
    max_timeout: float = 24 * 3600.0
    default_limits: Limits = field(default_factory=Limits)
    max_file_bytes: int = 4 * 1024**3  # largest single upload accepted
    metrics_interval: float = 5.0  # seconds between a server's resource samples of each running sandbox
    enabled_runtimes: tuple[str, ...] = ("namespace", "gvisor", "microvm")
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
    # CORRAL_TLS_CERT / CORRAL_TLS_KEY: PEM files; with both, corral serve speaks HTTPS only (server/tls.py)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # CORRAL_SERVER_HTTP2 / --http2: serve under hypercorn, HTTP/2 besides HTTP/1.1 on the same port (h2c by
    # prior knowledge or Upgrade in the clear, ALPN h2 with TLS); False: uvicorn, HTTP/1.1 only (server/run.py)
    http2: bool = False
    # CORRAL_E2B_DOMAIN: E2B's domain mode (E2B_DOMAIN on the client): the API at api.{domain}, envd and the
    # code interpreter at {port}-{sandbox_id}.{domain}; every name under it is E2B's (server/e2b/sandbox_host)
    e2b_domain: str | None = None
    # warm pools (core/pools.py)
    max_pool_size: int = 64  # members one pool may keep
    pool_interval: float = 5.0  # seconds between pool reconcile passes when nothing wakes them sooner
    pool_start_concurrency: int = 2  # members booting at once: a boot is CPU-bound (2 cores here)
    pool_member_max_age: float = 6 * 3600.0  # safety deadline of unclaimed members; replaced before it
    # runtimes: this server's node id (the reaper acts only on its own node's sandboxes; "" = derived from
    # the host and data dir, see default_node) and each runtime's own options ([runtime.<name>] tables)
    node: str = ""
    runtime_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # sandbox egress ([network], CORRAL_EGRESS_*): the uplink namespace (default: the host's own, its default
    # route), upstream resolvers, ranges never reachable besides the fixed ones (cluster/service CIDRs), caps
    egress: EgressConfig = field(default_factory=EgressConfig)
    # [e2b] internet_by_default (CORRAL_E2B_INTERNET_BY_DEFAULT): what an E2B create that makes no egress
    # choice gets. E2B gives such a sandbox the internet; Corral gives every sandbox no network unless asked,
    # and SDKs up to 2.45 send allow_internet_access=true on every create, so "true" is no choice either.
    # False (the default) keeps Corral's rule; true is E2B's (public addresses only, as network="internet").
    e2b_internet_by_default: bool = False
    # the key sandbox secrets are sealed with at rest ([secrets] key_file, CORRAL_SECRETS_KEY_FILE); None:
    # <data_dir>/secrets.key, made 0600 on first use. Servers sharing a database share this key.
    secrets_key_file: Path | None = None

    def __post_init__(self) -> None:
        if not self.node:
            object.__setattr__(self, "node", default_node(self.data_dir.expanduser().absolute()))
        elif not _NODE.fullmatch(self.node):
            raise InvalidRequest(
                f"the node id must be 1-63 characters a-z, A-Z, 0-9, '.', '_', ':', '-', got {self.node!r}"
            )

    @property
    def ports_domain(self) -> str:
        """Where the port proxy serves sandbox ports: ``{port}-{sandbox_id}.{ports_domain}``."""
        return self.sandbox_domain or f"localhost:{self.port}"

    @property
    def e2b_sandbox_domain(self) -> str | None:
        """The ``domain`` E2B's create/connect answers name: where the SDK reaches envd (None: its own)."""
        return self.e2b_domain or self.sandbox_domain

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def state_root(self) -> Path:
        return self.data_dir / "sandboxes"

    @property
    def cache_root(self) -> Path:
        return self.data_dir / "cache"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "corral.db"

    @property
    def secrets_key_path(self) -> Path:
        return self.secrets_key_file or self.data_dir / "secrets.key"

    def options_for(self, runtime: str) -> Mapping[str, Any]:
        """The ``[runtime.<runtime>]`` table (empty when there is none)."""
        return self.runtime_options.get(runtime, {})

    @classmethod
    def load(
        cls, env: Mapping[str, str] | None = None, *, config: Path | None = None, **overrides: Any
    ) -> Settings:
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        runtime_options: dict[str, dict[str, Any]] = {}
        path = config or (Path(env["CORRAL_CONFIG"]) if env.get("CORRAL_CONFIG") else None)
        if path is None and _default_config_file(env).is_file():
            path = _default_config_file(env)
        if path is not None:
            file_values, file_options = _read_file(path)
            values.update(file_values)
            runtime_options.update(file_options)
        if env.get("CORRAL_NODE"):
            values["node"] = env["CORRAL_NODE"]
        for name, value in env.items():
            if name.startswith("CORRAL_RUNTIME_") and value:
                runtime, _, option = name[len("CORRAL_RUNTIME_") :].lower().partition("_")
                if runtime and option:
                    runtime_options.setdefault(runtime, {})[option] = value
        if env.get("CORRAL_DATA_DIR"):
            values["data_dir"] = Path(env["CORRAL_DATA_DIR"])
        if env.get("CORRAL_SECRETS_KEY_FILE"):
            values["secrets_key_file"] = Path(env["CORRAL_SECRETS_KEY_FILE"])
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
        if env.get("CORRAL_E2B_DOMAIN"):
            values["e2b_domain"] = env["CORRAL_E2B_DOMAIN"]
        for key, name in (("tls_cert", "CORRAL_TLS_CERT"), ("tls_key", "CORRAL_TLS_KEY")):
            if env.get(name):
                values[key] = Path(env[name])
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
        if env.get("CORRAL_SERVER_HTTP2"):
            values["http2"] = _flag("CORRAL_SERVER_HTTP2", env)
        if env.get("CORRAL_E2B_INTERNET_BY_DEFAULT"):
            values["e2b_internet_by_default"] = _flag("CORRAL_E2B_INTERNET_BY_DEFAULT", env)
        egress = _egress_from_env(env, values.get("egress"))
        if egress is not None:
            values["egress"] = egress
        for runtime, table in (overrides.pop("runtime_options", None) or {}).items():
            runtime_options.setdefault(runtime, {}).update(table)
        values.update({k: v for k, v in overrides.items() if v is not None})
        values["runtime_options"] = runtime_options
        if isinstance(values.get("e2b_domain"), str):
            values["e2b_domain"] = values["e2b_domain"].lower().rstrip(".")
        settings = cls(**values)
        for name, domain in (
            ("CORRAL_SANDBOX_DOMAIN", settings.sandbox_domain),
            ("CORRAL_E2B_DOMAIN ([e2b] domain)", settings.e2b_domain),
        ):
            if domain is not None and not valid_domain(domain):
                raise InvalidRequest(
                    f"{name} must be a host name with an optional port, like sandbox.example.com "
                    f"or localhost:8700 (no scheme, no path), got {domain!r}"
                )
        if (settings.tls_cert is None) != (settings.tls_key is None):
            raise InvalidRequest(
                "TLS needs both a certificate and its key: set [server] tls_cert and tls_key "
                "(CORRAL_TLS_CERT, CORRAL_TLS_KEY), or neither; `corral certs make` makes a pair"
            )
        return replace(
            settings,
            data_dir=settings.data_dir.expanduser().absolute(),
            tls_cert=settings.tls_cert.expanduser().absolute() if settings.tls_cert else None,
            tls_key=settings.tls_key.expanduser().absolute() if settings.tls_key else None,
        )


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _flag(name: str, env: Mapping[str, str]) -> bool:
    value = env[name].strip().lower()
    if value not in _TRUE + _FALSE:
        raise InvalidRequest(f"{name} must be true or false, got {env[name]!r}")
    return value in _TRUE


def _read_file(path: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The config file's Settings fields and runtime tables; InvalidRequest names a bad file or key."""
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise InvalidRequest(f"cannot read the config file {path}: {exc.strerror}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"the config file {path} is not valid TOML: {exc}") from exc
    types = {f.name: f.type for f in fields(Settings)}
    values: dict[str, Any] = {}
    options: dict[str, dict[str, Any]] = {}

    def put(group: str, key: str, value: Any) -> None:
        name = FILE_KEYS.get((group, key))
        where = f"[{group}] {key}" if group else key
        if name is None:
            raise InvalidRequest(f"the config file {path} has an unknown setting {where}")
        kind = str(types[name])
        if name in ("data_dir", "secrets_key_file"):
            value = Path(str(value))
        elif name == "enabled_runtimes":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise InvalidRequest(f"{where} in {path} must be a list of runtime names")
            value = tuple(value)
        elif kind.startswith("pathlib.Path") or kind.startswith("Path"):
            if not isinstance(value, str) or not value:
                raise InvalidRequest(f"{where} in {path} must be a file path (a string)")
            value = path.parent / Path(value).expanduser()  # relative: to the config file's folder
        elif kind.startswith("float") and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        ok = {"str": str, "int": int, "float": float, "bool": bool}
        want = next((t for k, t in ok.items() if kind.startswith(k)), None)
        if want is not None and (
            not isinstance(value, want) or (want is not bool and isinstance(value, bool))
        ):
            raise InvalidRequest(f"{where} in {path} must be a {want.__name__}, got {value!r}")
        values[name] = value

    for key, value in data.items():
        if isinstance(value, dict) and key == "runtime":
            for rkey, rvalue in value.items():
                if isinstance(rvalue, dict):
                    options[rkey] = dict(rvalue)
                else:
                    put("runtime", rkey, rvalue)
        elif isinstance(value, dict) and key == "network":
            values["egress"] = _egress(value, f"[network] in {path}")
        elif isinstance(value, dict) and key == "limits":
            unknown = sorted(set(value) - set(_LIMIT_KEYS))
            if unknown:
                raise InvalidRequest(f"the config file {path} has an unknown setting [limits] {unknown[0]}")
            try:
                values["default_limits"] = Limits(**value)
            except TypeError as exc:
                raise InvalidRequest(f"[limits] in {path}: {exc}") from exc
        elif isinstance(value, dict):
            for gkey, gvalue in value.items():
                put(key, gkey, gvalue)
        else:
            put("", key, value)
    return values, options


_EGRESS_KEYS = {
    "uplink_netns": str,
    "resolvers": tuple,
    "denied_ranges": tuple,
    "lab_ranges": tuple,
    "subnet": str,
    "subnet6": str,
    "max_connections": int,
    "bandwidth_bytes": int,
    "upstream_ca_file": str,
}


def _egress(table: Mapping[str, Any], where: str) -> EgressConfig:
    unknown = sorted(set(table) - set(_EGRESS_KEYS))
    if unknown:
        raise InvalidRequest(f"{where}: unknown setting {unknown[0]}; known: {', '.join(_EGRESS_KEYS)}")
    values: dict[str, Any] = {}
    for key, value in table.items():
        kind = _EGRESS_KEYS[key]
        if kind is tuple:
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
                raise InvalidRequest(f"{where}: {key} must be a list of addresses or CIDRs")
            value = tuple(value)
        elif kind is int:
            try:
                value = int(value)
            except (TypeError, ValueError) as exc:
                raise InvalidRequest(f"{where}: {key} must be a whole number, got {value!r}") from exc
        elif not isinstance(value, str):
            raise InvalidRequest(f"{where}: {key} must be a string")
        values[key] = value
    return EgressConfig(**values)


def _egress_from_env(env: Mapping[str, str], base: EgressConfig | None) -> EgressConfig | None:
    """``CORRAL_EGRESS_<KEY>`` over the file's ``[network]`` table."""
    table = {k: v for k in _EGRESS_KEYS if (v := env.get(f"CORRAL_EGRESS_{k.upper()}"))}
    if not table:
        return base
    merged = {**(dataclasses.asdict(base) if base is not None else {}), **table}
    merged.pop("proxy_port", None)
    return _egress(merged, "CORRAL_EGRESS_*")
