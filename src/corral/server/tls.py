"""HTTPS for ``corral serve``: the certificate and key of ``[server] tls_cert`` / ``tls_key``, checked up front.

uvicorn loads the files itself when it starts, and a missing file or a key that does not match its certificate
would end it in a traceback. :func:`check` loads them first, into the same kind of server context, and turns
every way they can be wrong into one :class:`~corral.errors.InvalidRequest` that names the setting and the
file. These messages go to the operator's console at start-up only; a client never sees a host path (a
client that does not trust the certificate fails its TLS handshake and learns nothing else).

With ``[e2b] domain`` set, :func:`check` also says which of the names E2B's SDK will ask for
(``api.{domain}``, ``{port}-{id}.{domain}``) the certificate does not cover: the SDK would fail with a host
name mismatch that is hard to trace back to the server.
"""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from corral.core.settings import Settings
from corral.errors import InvalidRequest

__all__ = ["TlsFiles", "check", "names_covered", "uncovered_e2b_names"]


@dataclass(frozen=True, kw_only=True)
class TlsFiles:
    cert: Path
    key: Path
    names: tuple[str, ...]  # the certificate's DNS names (subjectAltName)


def check(settings: Settings) -> TlsFiles | None:
    """The TLS files of ``settings`` once they are known to load, or None when TLS is off."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    cert, key = settings.tls_cert, settings.tls_key
    for path, what, setting in ((cert, "certificate", "tls_cert"), (key, "key", "tls_key")):
        if not path.is_file():
            raise InvalidRequest(
                f"the TLS {what} file {path} ([server] {setting}, CORRAL_{setting.upper()}) does not exist "
                "or is not a file"
            )
    try:
        parsed = x509.load_pem_x509_certificate(cert.read_bytes())
    except OSError as exc:
        raise InvalidRequest(f"cannot read the TLS certificate file {cert}: {exc.strerror}") from exc
    except ValueError as exc:
        raise InvalidRequest(
            f"the TLS certificate file {cert} ([server] tls_cert) is not a PEM certificate"
        ) from exc
    try:
        private = serialization.load_pem_private_key(key.read_bytes(), password=None)
    except OSError as exc:
        raise InvalidRequest(f"cannot read the TLS key file {key}: {exc.strerror}") from exc
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:  # TypeError: it needs a passphrase
        raise InvalidRequest(
            f"the TLS key file {key} ([server] tls_key) is not a PEM private key without a passphrase"
        ) from exc
    if private.public_key() != parsed.public_key():
        raise InvalidRequest(
            f"the TLS key file {key} ([server] tls_key) is not the key of the certificate in {cert}"
        )
    try:  # what uvicorn will do with them (OpenSSL's own view, e.g. of key types it cannot serve with)
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise InvalidRequest(
            f"OpenSSL cannot serve with {cert} and {key}: {exc.reason or 'unusable key or certificate'}"
        ) from exc
    return TlsFiles(cert=cert, key=key, names=_dns_names(parsed))


def _dns_names(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    return tuple(n.lower() for n in san.get_values_for_type(x509.DNSName))


def names_covered(names: tuple[str, ...], host: str) -> bool:
    """Whether a certificate for ``names`` is valid for ``host`` (RFC 6125: ``*`` stands for one label)."""
    host = host.lower().rstrip(".")
    try:
        ipaddress.ip_address(host)
        return False  # IP addresses are matched against IP SANs, which these names are not
    except ValueError:
        pass
    for name in names:
        if name == host:
            return True
        if name.startswith("*.") and "." in host and host.split(".", 1)[1] == name[2:]:
            return True
    return False


def uncovered_e2b_names(files: TlsFiles, domain: str) -> list[str]:
    """Names E2B's SDK asks for under ``domain`` that the certificate is not valid for."""
    name = domain.rsplit(":", 1)[0]
    wanted = [f"api.{name}", f"49983-sandboxid.{name}"]
    return [h for h in wanted if not names_covered(files.names, h)]
