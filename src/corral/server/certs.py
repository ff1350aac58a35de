"""A local certificate authority and a wildcard server certificate for a domain (``corral certs make``).

For a deployment without a public CA (a LAN, a lab, CI): E2B's domain mode needs HTTPS for ``api.{domain}``
and every ``{port}-{id}.{domain}``, so the server certificate names ``{domain}``, ``*.{domain}`` and
``api.{domain}``. Clients trust the CA's certificate (``SSL_CERT_FILE=ca.pem`` for E2B's SDK and Python), and
the CA's key can sign the next domain's certificate, so clients trust one file however many domains there are.

Built with ``cryptography`` (the well-kept library Python's own TLS stack is tested against); ECDSA P-256 keys,
SHA-256 signatures. Key files are written mode 0600, through a temporary file and a rename: an interrupted run
leaves no half key behind.
"""

from __future__ import annotations

import datetime
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from corral.core.pki import new_ca
from corral.errors import InvalidRequest

__all__ = ["CertPaths", "make_certs"]

CA_DAYS = 3650
LEAF_DAYS = 397  # the longest lifetime browsers accept for a server certificate


@dataclass(frozen=True, kw_only=True)
class CertPaths:
    ca_cert: Path
    ca_key: Path
    cert: Path
    key: Path
    ca_created: bool


def _write(path: Path, data: bytes, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _load_ca(cert_path: Path, key_path: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise InvalidRequest(
            f"{cert_path} and {key_path} are not a CA certificate and its unencrypted key; move them away "
            "to make a new CA"
        ) from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise InvalidRequest(f"the key in {key_path} is not the key of the CA certificate {cert_path}")
    return cert, key


def _new_ca(now: datetime.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Corral local CA")])
    return new_ca(name, now=now, days=CA_DAYS, backdate=datetime.timedelta(minutes=5))


def _leaf(
    domain: str, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, now: datetime.datetime
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.DNSName(n) for n in (domain, f"*.{domain}", f"api.{domain}")]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"*.{domain}")]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=LEAF_DAYS))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def make_certs(domain: str, out: Path, *, force: bool = False) -> CertPaths:
    """Write ``ca.pem``/``ca.key`` (made once, reused after) and ``{domain}.pem``/``{domain}.key`` into ``out``.

    An existing server certificate for ``domain`` is kept unless ``force``: InvalidRequest says so.
    """
    from corral.core.settings import valid_domain

    domain = domain.lower().rstrip(".")
    if ":" in domain or not valid_domain(domain) or "." not in domain:
        raise InvalidRequest(
            f"--domain must be a DNS name with at least two labels and no port, like sandbox.example.com; "
            f"got {domain!r}"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InvalidRequest(f"cannot make the folder {out}: {exc.strerror}") from exc
    paths = CertPaths(
        ca_cert=out / "ca.pem",
        ca_key=out / "ca.key",
        cert=out / f"{domain}.pem",
        key=out / f"{domain}.key",
        ca_created=not (out / "ca.pem").exists(),
    )
    if not force and (paths.cert.exists() or paths.key.exists()):
        raise InvalidRequest(f"{paths.cert} already exists; pass --force to replace it")
    now = datetime.datetime.now(datetime.UTC)
    try:
        if paths.ca_created:
            ca, ca_key = _new_ca(now)
            _write(paths.ca_key, _key_pem(ca_key), 0o600)
            _write(paths.ca_cert, ca.public_bytes(serialization.Encoding.PEM), 0o644)
        else:
            ca, ca_key = _load_ca(paths.ca_cert, paths.ca_key)
        cert, key = _leaf(domain, ca, ca_key, now)
        _write(paths.key, _key_pem(key), 0o600)
        _write(paths.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    except OSError as exc:
        raise InvalidRequest(f"cannot write the certificates into {out}: {exc.strerror}") from exc
    return paths
