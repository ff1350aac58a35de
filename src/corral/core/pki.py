"""The one self-signed CA Corral makes: P-256, ``path_length=0``, signing certificates and CRLs only.

Two users: the per-sandbox egress CA of :mod:`corral.core.secrets` (name-constrained to the hosts its
secrets are bound to) and the local CA of ``corral certs make`` (:mod:`corral.server.certs`, unconstrained).
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

__all__ = ["new_ca"]


def new_ca(
    name: x509.Name,
    *,
    now: datetime.datetime,
    days: int,
    backdate: datetime.timedelta,
    permitted: Sequence[str] | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A fresh CA valid from ``now - backdate`` (clock skew) for ``days``; with ``permitted`` it can vouch
    only for those DNS names and their subdomains (a critical NameConstraints extension)."""
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - backdate)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if permitted is not None:
        subtrees: list[x509.GeneralName] = [x509.DNSName(h) for h in permitted]
        builder = builder.add_extension(
            x509.NameConstraints(permitted_subtrees=subtrees, excluded_subtrees=None), critical=True
        )
    return builder.sign(key, hashes.SHA256()), key
