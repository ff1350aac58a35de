"""``corral serve`` and the admin commands of the host that runs it: tenants, keys, audit.

The admin commands work on the server's store directly (the same data directory or ``CORRAL_DATABASE_URL``),
like ``kubeadm token create``: whoever can read the store on the server host is an administrator anyway, and
it bootstraps the first keys before any exist. The same operations are in the REST API for admin keys.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import anyio
import click

from corral.cli._output import emit_json, err_console, table
from corral.core.audit import AuditAction, AuditLog, iter_entries, verify
from corral.core.auth import AuthService, Quotas
from corral.core.settings import Settings
from corral.core.store import Store
from corral.store import open_store

__all__ = ["audit", "keys", "serve", "tenants"]

T = TypeVar("T")


@dataclass(frozen=True)
class _Admin:
    store: Store
    auth: AuthService
    log: AuditLog


def _with_auth(fn: Callable[[_Admin], Awaitable[T]]) -> T:
    async def go() -> T:
        store = open_store(Settings.load())
        try:
            return await fn(_Admin(store, AuthService(store), AuditLog(store, clock=time.time)))
        finally:
            await store.aclose()

    return anyio.run(go)


@click.command()
@click.option("--host", default=None, help="Address to listen on [default: 127.0.0.1, or CORRAL_HOST].")
@click.option("--port", type=int, default=None, help="Port [default: 8700, or CORRAL_PORT].")
@click.option("--database-url", default=None, help="postgresql://… instead of the embedded SQLite store.")
@click.option(
    "--config",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="TOML settings file [default: CORRAL_CONFIG, or ~/.config/corral/config.toml if it exists].",
)
@click.option(
    "--node", default=None, help="This server's node id [default: CORRAL_NODE, or host + data dir]."
)
@click.option(
    "--runtime-option",
    "runtime_option",
    multiple=True,
    metavar="RUNTIME.KEY=VALUE",
    help="One option of a runtime's [runtime.<name>] table, e.g. gvisor.platform=systrap (repeatable).",
)
@click.option(
    "--tls-cert",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="PEM certificate (chain) to serve HTTPS with [default: [server] tls_cert, or CORRAL_TLS_CERT].",
)
@click.option(
    "--tls-key",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="PEM private key of --tls-cert [default: [server] tls_key, or CORRAL_TLS_KEY].",
)
@click.option(
    "--http2/--no-http2",
    default=None,
    help="Serve HTTP/2 besides HTTP/1.1 (hypercorn: h2c in the clear, ALPN h2 with TLS) "
    "[default: [server] http2, or CORRAL_SERVER_HTTP2; off: uvicorn, HTTP/1.1].",
)
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]))
@click.option(
    "--log-format",
    default="auto",
    type=click.Choice(["auto", "json", "text"]),
    help="json: one object per line; text: for people; auto: text on a terminal, else json.",
)
@click.option("--log-file", default=None, help="Append the logs (JSON) to this file instead of stderr.")
def serve(
    host: str | None,
    port: int | None,
    database_url: str | None,
    config: Path | None,
    node: str | None,
    runtime_option: tuple[str, ...],
    tls_cert: Path | None,
    tls_key: Path | None,
    http2: bool | None,
    log_level: str,
    log_format: str,
    log_file: str | None,
) -> None:
    """Run the Corral API server (REST, NDJSON and WebSocket streams, /metrics, /healthz, /readyz)."""
    from corral.server import tls
    from corral.server.app import create_app
    from corral.server.logs import configure_logging
    from corral.server.run import run

    settings = Settings.load(
        config=config,
        host=host,
        port=port,
        database_url=database_url,
        node=node,
        tls_cert=tls_cert,
        tls_key=tls_key,
        http2=http2,
        runtime_options=_runtime_options(runtime_option),
    )
    files = tls.check(settings)  # before anything starts: a bad file is a clear error, not a traceback
    try:
        configure_logging(getattr(logging, log_level.upper()), fmt=log_format, file=log_file)
    except OSError as exc:
        raise click.UsageError(f"cannot write the log file {log_file}: {exc.strerror}") from None
    if files is not None and settings.e2b_domain:
        for name in tls.uncovered_e2b_names(files, settings.e2b_domain):
            err_console.print(
                f"[bold yellow]warning:[/bold yellow] the TLS certificate is not valid for {name}: E2B's SDK "
                f"(E2B_DOMAIN={settings.e2b_domain}) will refuse it; see corral certs make"
            )
    app = create_app(settings)
    scheme = "https" if files is not None else "http"
    err_console.print(
        f"corral: serving on {scheme}://{settings.host}:{settings.port} "
        + ("(HTTP/2 and HTTP/1.1; " if settings.http2 else "(")
        + f"data: {settings.data_dir}); "
        "point clients at it with CORRAL_URL and CORRAL_API_KEY"
        + (f"; E2B's SDK with E2B_DOMAIN={settings.e2b_domain}" if settings.e2b_domain else "")
        + (f"; logs: {log_file}" if log_file else "")
    )
    run(app, settings, files)  # uvicorn, or hypercorn with http2 (server/run.py)


def _runtime_options(items: tuple[str, ...]) -> dict[str, dict[str, str]]:
    """``gvisor.platform=systrap`` → ``{"gvisor": {"platform": "systrap"}}`` (typed by the runtime later)."""
    tables: dict[str, dict[str, str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        runtime, dot, option = key.partition(".")
        if not sep or not dot or not runtime or not option:
            raise click.BadParameter(f"{item!r} is not RUNTIME.KEY=VALUE", param_hint="--runtime-option")
        tables.setdefault(runtime.strip(), {})[option.strip()] = value
    return tables


# -- tenants ---------------------------------------------------------------------------------------------------


def _quota_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--max-timeout", type=float, help="Longest sandbox lifetime, seconds.")(fn)
    fn = click.option("--max-memory-mb", type=int, help="Total memory of live sandboxes, MiB.")(fn)
    return click.option("--max-sandboxes", type=int, help="Live sandboxes at once.")(fn)


@click.group()
def tenants() -> None:
    """Tenants and their quotas (on the server host)."""


@tenants.command("create")
@click.argument("name")
@_quota_options
@click.option("--json", "as_json", is_flag=True)
def tenants_create(
    name: str, max_sandboxes: int | None, max_memory_mb: int | None, max_timeout: float | None, as_json: bool
) -> None:
    """Create tenant NAME."""
    quotas = Quotas(max_sandboxes=max_sandboxes, max_memory_mb=max_memory_mb, max_timeout=max_timeout)

    async def go(a: _Admin) -> Any:
        auth, log = a.auth, a.log
        record = await auth.create_tenant(name, quotas=quotas)
        await log.record(AuditAction.TENANT_CREATE, tenant_id=record.tenant_id, name=name, by="cli")
        return record

    record = _with_auth(go)
    emit_json(record.to_wire()) if as_json else click.echo(
        f"created tenant {record.name} ({record.tenant_id})"
    )


@tenants.command("list")
@click.option("--json", "as_json", is_flag=True)
def tenants_list(as_json: bool) -> None:
    """List tenants and their quotas."""

    async def go(a: _Admin) -> Any:
        auth = a.auth
        return await auth.store.list_tenants()

    records = _with_auth(go)
    if as_json:
        emit_json([r.to_wire() for r in records])
        return

    def q(v: object) -> str:
        return "-" if v is None else f"{v:g}" if isinstance(v, float) else str(v)

    table(
        ["NAME", "ID", "MAX SANDBOXES", "MAX MEMORY MB", "MAX TIMEOUT S"],
        [
            [
                r.name,
                r.tenant_id,
                q(r.quotas.max_sandboxes),
                q(r.quotas.max_memory_mb),
                q(r.quotas.max_timeout),
            ]
            for r in records
        ],
    )


@tenants.command("set-quotas")
@click.argument("name")
@_quota_options
def tenants_set_quotas(
    name: str, max_sandboxes: int | None, max_memory_mb: int | None, max_timeout: float | None
) -> None:
    """Replace the quotas of tenant NAME (an option left out means unlimited)."""
    quotas = Quotas(max_sandboxes=max_sandboxes, max_memory_mb=max_memory_mb, max_timeout=max_timeout)

    async def go(a: _Admin) -> Any:
        auth = a.auth
        return await auth.set_quotas(name, quotas)

    record = _with_auth(go)
    click.echo(f"tenant {record.name}: {record.quotas.to_wire()}")


# -- keys ------------------------------------------------------------------------------------------------------


@click.group()
def keys() -> None:
    """API keys (on the server host). Keys are shown once and stored hashed."""


@keys.command("create")
@click.option("--tenant", help="Tenant name; created (without quotas) if it does not exist.")
@click.option("--admin", is_flag=True, help="An admin key: manages tenants, keys and the audit log.")
@click.option("--name", default="", help="A label for the key.")
@click.option(
    "--e2b", "e2b", is_flag=True, help="Write the key in E2B's form (e2b_…), for E2B's SDK (E2B_API_KEY)."
)
def keys_create(tenant: str | None, admin: bool, name: str, e2b: bool) -> None:
    """Create an API key; the key itself is printed on the last line, once."""
    if admin == (tenant is not None):
        raise click.UsageError("give either --tenant NAME or --admin")
    if e2b and admin:
        raise click.UsageError("--e2b makes a tenant key (E2B's SDK has no use for an admin key)")

    async def go(a: _Admin) -> Any:
        auth, log = a.auth, a.log
        if tenant is not None and await auth.store.get_tenant_by_name(tenant) is None:
            record = await auth.create_tenant(tenant)
            await log.record(AuditAction.TENANT_CREATE, tenant_id=record.tenant_id, name=tenant, by="cli")
            err_console.print(f"created tenant {tenant} (no quotas; see corral tenants set-quotas)")
        new = await auth.create_key(tenant=tenant, name=name, e2b=e2b)
        await log.record(
            AuditAction.KEY_CREATE, tenant_id=new.record.tenant_id, key_id=new.record.key_id, by="cli"
        )
        return new

    new = _with_auth(go)
    who = "admin" if admin else f"tenant {tenant}"
    err_console.print(f"created key {new.record.key_id} for {who}; it is shown only now:")
    click.echo(new.token)


@keys.command("list")
@click.option("--json", "as_json", is_flag=True)
def keys_list(as_json: bool) -> None:
    """List keys (never their secrets)."""

    async def go(a: _Admin) -> Any:
        auth = a.auth
        names = {t.tenant_id: t.name for t in await auth.store.list_tenants()}
        return names, await auth.store.list_keys()

    names, records = _with_auth(go)
    if as_json:
        emit_json([r.to_wire() for r in records])
        return
    table(
        ["KEY", "TENANT", "NAME", "REVOKED"],
        [
            [
                r.key_id,
                "(admin)" if r.admin else names.get(r.tenant_id, str(r.tenant_id)),
                r.name,
                "yes" if r.revoked_at else "",
            ]
            for r in records
        ],
    )


@keys.command("revoke")
@click.argument("key_id")
def keys_revoke(key_id: str) -> None:
    """Revoke key KEY_ID at once."""

    async def go(a: _Admin) -> Any:
        auth, log = a.auth, a.log
        record = await auth.revoke_key(key_id)
        await log.record(AuditAction.KEY_REVOKE, tenant_id=record.tenant_id, key_id=record.key_id, by="cli")
        return record

    _with_auth(go)
    click.echo(f"revoked {key_id}")


# -- audit -----------------------------------------------------------------------------------------------------


@click.group()
def audit() -> None:
    """The append-only, hash-chained audit log."""


@audit.command("verify")
def audit_verify() -> None:
    """Check every link of the hash chain; exit 1 naming the first bad entry."""

    async def go(a: _Admin) -> Any:
        return await verify(a.store)

    result = _with_auth(go)
    if result.ok:
        click.echo(f"audit log intact: {result.entries} entries, head {result.head_hash}")
        return
    err_console.print(
        f"[bold red]audit log TAMPERED:[/bold red] entry {result.first_bad_seq}: {result.problem} "
        f"({result.entries} entries before it verify)"
    )
    sys.exit(1)


@audit.command("export")
@click.option("--after", type=int, default=0, help="Only entries after this sequence number.")
def audit_export(after: int) -> None:
    """Print the audit log as JSON lines."""

    async def go(a: _Admin) -> int:
        count = 0
        async for entry in iter_entries(a.store, after_seq=after):
            click.echo(entry.to_json())
            count += 1
        return count

    _with_auth(go)
