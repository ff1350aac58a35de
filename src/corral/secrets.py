"""Secrets that never enter the sandbox: parsed and bound to hosts here, substituted by the egress proxy.

``Sandbox.create(secrets={"OPENAI_KEY": "sk-…"}, network={"allow_out": ["api.openai.com"]})``: the sandbox's
environment holds only a placeholder (``CORRAL_SECRET_OPENAI_KEY_<32 hex>``, new for every sandbox); the
egress proxy (:mod:`corral.runtimes._net.intercept`) terminates TLS to the hosts the secret is bound to with
a per-sandbox CA and puts the real value in place of the placeholder in the request headers (and, with
``"body": True``, the body) there, and nowhere else. A secret is either a string, bound to the policy's
``allow_out`` host names, or ``{"value": "…", "hosts": ["api.openai.com", "*.example.com"], "body": False}``;
every bound host must be one the policy allows.

The value must be printable ASCII (it travels in HTTP headers, so no CR/LF can smuggle a header in). At rest
the service keeps values only sealed (:class:`corral.core.secrets.Sealer`); the CA's private key lives in the
egress process's memory and in nothing else. Only the standard library: the SDK checks the shape too.
"""

from __future__ import annotations

import re
import secrets as _random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from corral.errors import InvalidRequest
from corral.netpolicy import NetworkPolicy, Rule

__all__ = ["CA_BUNDLE_PATH", "CA_PATH", "SecretBinding", "check_shape", "parse_secrets", "trust_env"]

MAX_SECRETS = 32
MAX_VALUE = 8192
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_VALUE = re.compile(r"[\x20-\x7e]+")
PREFIX = "CORRAL_SECRET_"
# where the sandbox finds the CA: the system bundle is rewritten with it appended, and it is kept alone too
CA_BUNDLE_PATH = "/etc/ssl/certs/ca-certificates.crt"
CA_PATH = "/etc/ssl/certs/corral-egress-ca.pem"


def trust_env() -> dict[str, str]:
    """Environment that makes Python (ssl, requests, httpx), curl, git and Node trust the egress CA."""
    return {
        "SSL_CERT_FILE": CA_BUNDLE_PATH,
        "REQUESTS_CA_BUNDLE": CA_BUNDLE_PATH,
        "CURL_CA_BUNDLE": CA_BUNDLE_PATH,
        "GIT_SSL_CAINFO": CA_BUNDLE_PATH,
        "NODE_EXTRA_CA_CERTS": CA_PATH,
    }


@dataclass(frozen=True, kw_only=True)
class SecretBinding:
    """One secret of one sandbox: its name (the env variable), value, placeholder and bound host rules."""

    name: str
    value: str = field(repr=False)
    hosts: tuple[str, ...]
    body: bool = False
    placeholder: str = field(default="", repr=False)

    def to_wire(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "hosts": list(self.hosts),
            "body": self.body,
            "placeholder": self.placeholder,
        }

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> SecretBinding:
        return cls(
            name=str(data["name"]),
            value=str(data["value"]),
            hosts=tuple(data["hosts"]),
            body=bool(data.get("body", False)),
            placeholder=str(data["placeholder"]),
        )

    def binds(self, host: str) -> bool:
        host = host.rstrip(".").lower()
        return any(Rule.parse(h, allow=True).matches_name(host) for h in self.hosts)


def check_shape(value: object) -> dict[str, Any]:
    """The request's ``secrets`` in its wire form, refused (typed, without echoing a value) when malformed."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidRequest('secrets map names to values: {"OPENAI_KEY": "sk-..."}')
    if len(value) > MAX_SECRETS:
        raise InvalidRequest(f"a sandbox may have at most {MAX_SECRETS} secrets")
    out: dict[str, Any] = {}
    for name, spec in value.items():
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise InvalidRequest(
                f"secret names are environment variable names (letters, digits, _), got {str(name)[:64]!r}"
            )
        if isinstance(spec, str):
            spec = {"value": spec}
        if not isinstance(spec, Mapping) or set(spec) - {"value", "hosts", "body"}:
            raise InvalidRequest(
                f'secret {name}: a string, or {{"value": ..., "hosts": [...], "body": false}}',
                details={"secret": name},
            )
        secret = spec.get("value")
        if not isinstance(secret, str) or not 1 <= len(secret) <= MAX_VALUE or not _VALUE.fullmatch(secret):
            raise InvalidRequest(
                f"secret {name}: the value must be 1-{MAX_VALUE} printable ASCII characters",
                details={"secret": name},
            )
        hosts = spec.get("hosts")
        if hosts is not None and (
            not isinstance(hosts, list | tuple) or not all(isinstance(h, str) for h in hosts) or not hosts
        ):
            raise InvalidRequest(
                f"secret {name}: hosts is a non-empty list of host names", details={"secret": name}
            )
        body = spec.get("body", False)
        if not isinstance(body, bool):
            raise InvalidRequest(f"secret {name}: body is true or false", details={"secret": name})
        out[name] = {"value": secret, "hosts": list(hosts) if hosts is not None else None, "body": body}
    return out


def _host_rule(name: str, host: str) -> Rule:
    try:
        rule = Rule.parse(host, allow=True)
    except InvalidRequest as exc:
        raise InvalidRequest(f"secret {name}: {exc.message}", details={"secret": name}) from exc
    if rule.name is None or rule.port is not None:
        raise InvalidRequest(
            f"secret {name}: {host!r} is not a host name; secrets are bound to names (TLS checks them), "
            "not to addresses or ports",
            details={"secret": name},
        )
    return rule


def parse_secrets(value: object, policy: NetworkPolicy) -> tuple[SecretBinding, ...]:
    """Bindings with fresh placeholders; every host must be one ``policy`` lets the sandbox reach."""
    shaped = check_shape(value)
    if not shaped:
        return ()
    if not policy.enabled:
        raise InvalidRequest(
            "secrets are substituted by the egress proxy, so they need network: pass "
            'network={"allow_out": [...]} naming the hosts they are for'
        )
    defaults = [
        r.text.strip().lower() for r in policy.rules if r.allow and r.name is not None and r.port is None
    ]
    out = []
    for name, spec in shaped.items():
        hosts = spec["hosts"] if spec["hosts"] is not None else defaults
        if not hosts:
            raise InvalidRequest(
                f"secret {name} is bound to no host: give it hosts, or allow_out host names to bind it to",
                details={"secret": name},
            )
        for host in hosts:
            rule = _host_rule(name, host)
            assert rule.name is not None  # _host_rule refuses address rules
            probe = rule.name if not rule.wildcard else f"corral-probe.{rule.name}"
            if not policy.resolves(probe).allowed:
                raise InvalidRequest(
                    f"secret {name} is bound to {host}, which the network policy does not allow",
                    details={"secret": name, "host": host},
                )
        out.append(
            SecretBinding(
                name=name,
                value=spec["value"],
                hosts=tuple(h.strip().lower() for h in hosts),
                body=spec["body"],
                placeholder=f"{PREFIX}{name.upper()}_{_random.token_hex(16)}",
            )
        )
    return tuple(out)
