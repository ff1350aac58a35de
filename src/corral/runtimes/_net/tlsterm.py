"""TLS termination for the egress proxy: leaf certificates minted per name by a sandbox's CA, and a
sandbox-facing TLS server over memory BIOs (its ClientHello was already read to decide the connection).

Only ``http/1.1`` is offered by ALPN (HTTP/1.1 is what :mod:`.intercept` parses). Leaf keys and the CA key are
kept in memory; ``ssl`` loads a chain from a path only, so the leaf's PEM goes through a memfd, never a file.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import ssl

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

__all__ = ["CHUNK", "Leaves", "ServerTls"]

CHUNK = 64 * 1024
LEAF_DAYS = 7
MAX_LEAVES = 256


class Leaves:
    """Server contexts for the names one sandbox's CA vouches for, cached per name (one leaf key for all)."""

    def __init__(self, ca_cert: str, ca_key: str) -> None:
        self.ca_cert = x509.load_pem_x509_certificate(ca_cert.encode())
        key = serialization.load_pem_private_key(ca_key.encode(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        self._ca_key = key
        self._leaf_key = ec.generate_private_key(ec.SECP256R1())
        self._contexts: dict[str, ssl.SSLContext] = {}

    def context(self, name: str) -> ssl.SSLContext:
        ctx = self._contexts.get(name)
        if ctx is None:
            if len(self._contexts) >= MAX_LEAVES:
                self._contexts.clear()
            ctx = self._contexts[name] = self._make_context(name)
        return ctx

    def _make_context(self, name: str) -> ssl.SSLContext:
        now = datetime.datetime.now(datetime.UTC)
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, name)]))
            .issuer_name(self.ca_cert.subject)
            .public_key(self._leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(min(now + datetime.timedelta(days=LEAF_DAYS), self.ca_cert.not_valid_after_utc))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._ca_key.public_key()), critical=False
            )
            .sign(self._ca_key, hashes.SHA256())
        )
        pem = leaf.public_bytes(serialization.Encoding.PEM) + self._leaf_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_alpn_protocols(["http/1.1"])
        fd = os.memfd_create(
            "leaf", os.MFD_CLOEXEC
        )  # the key is never in a file: load_cert_chain wants a path
        try:
            os.write(fd, pem)
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return ctx


class ServerTls:
    """The sandbox-facing TLS of one connection, over memory BIOs (its first bytes were already read)."""

    def __init__(
        self, ctx: ssl.SSLContext, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes
    ) -> None:
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.reader, self.writer = reader, writer
        self.incoming.write(head)

    async def _flush(self) -> None:
        data = self.outgoing.read()
        if data:
            self.writer.write(data)
            await self.writer.drain()

    async def _fill(self) -> bool:
        data = await self.reader.read(CHUNK)
        if not data:
            self.incoming.write_eof()
            return False
        self.incoming.write(data)
        return True

    async def handshake(self) -> None:
        while True:
            try:
                self.obj.do_handshake()
                await self._flush()
                return
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._fill():
                    raise ConnectionResetError("the sandbox left during the TLS handshake") from None

    async def recv(self) -> bytes:
        while True:
            try:
                data = self.obj.read(CHUNK)
                await self._flush()
                return data
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._fill():
                    return b""
            except ssl.SSLZeroReturnError:
                return b""

    async def send(self, data: bytes) -> None:
        if data:
            self.obj.write(data)
            await self._flush()

    async def close(self) -> None:
        with contextlib.suppress(ssl.SSLError, OSError):
            self.obj.unwrap()
        with contextlib.suppress(OSError, RuntimeError):
            await self._flush()
