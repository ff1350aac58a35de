"""``corral certs make``: a local CA and a wildcard certificate for a domain (E2B's domain mode, HTTPS)."""

from __future__ import annotations

from pathlib import Path

import click

from corral.cli._output import err_console

__all__ = ["certs"]


@click.group()
def certs() -> None:
    """TLS certificates for corral serve, signed by a local CA that clients are told to trust."""


@certs.command("make")
@click.option("--domain", required=True, help="The domain, e.g. sandbox.example.com (E2B_DOMAIN's value).")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    show_default=True,
    help="Folder for ca.pem/ca.key (made once, then reused) and DOMAIN.pem/DOMAIN.key.",
)
@click.option("--force", is_flag=True, help="Replace an existing certificate for DOMAIN.")
def certs_make(domain: str, out: Path, force: bool) -> None:
    """Make a certificate for DOMAIN, *.DOMAIN and api.DOMAIN, signed by a local CA."""
    from corral.server.certs import make_certs

    paths = make_certs(domain, out.expanduser().absolute(), force=force)
    made = "made a new CA" if paths.ca_created else "signed with the existing CA"
    err_console.print(f"corral: {made} ({paths.ca_cert}); keys are mode 0600. To serve with it:")
    click.echo(f"export CORRAL_TLS_CERT={paths.cert} CORRAL_TLS_KEY={paths.key} CORRAL_E2B_DOMAIN={domain}")
    err_console.print(
        f"and on clients, trust the CA: SSL_CERT_FILE={paths.ca_cert} (E2B's SDK, Python), or add it to the "
        f"system store (update-ca-certificates); DNS must send *.{domain} and api.{domain} to the server"
    )
