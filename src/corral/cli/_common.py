"""Options and helpers shared by several commands."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import click

from corral.cli._output import exit_status, progress, stream_events
from corral.client._sync.sandbox import Sandbox
from corral.models import ExecParams

__all__ = [
    "create_options",
    "exec_options",
    "exec_params_from",
    "key_values",
    "open_sandbox",
    "sandbox_kwargs",
]

F = TypeVar("F", bound=Callable[..., Any])


def key_values(values: tuple[str, ...], what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint=what)
        out[key] = value
    return out


def create_options(fn: F) -> F:
    for decorator in reversed(
        [
            click.option(
                "--isolation",
                default=None,
                metavar="LEVEL",
                help="Isolation level: namespace, gvisor, microvm, or what the server offers (a Kubernetes"
                " server: e.g. kata-fc). Default: the server's, or $CORRAL_ISOLATION.",
            ),
            click.option("--template", default=None, help="Template to start from (default: base)."),
            click.option(
                "--timeout",
                "sandbox_timeout",
                type=float,
                default=None,
                help="Seconds until the sandbox is killed (default 300).",
            ),
            click.option("--memory", "memory_mb", type=int, default=None, help="Memory limit in MiB."),
            click.option("--cpus", type=float, default=None, help="CPU limit (cores)."),
            click.option("--metadata", "-m", multiple=True, metavar="KEY=VALUE", help="Label the sandbox."),
            click.option(
                "--sandbox-env",
                multiple=True,
                metavar="KEY=VALUE",
                help="Environment variable for every process in the sandbox.",
            ),
            *network_options(),
            click.option(
                "--secret",
                "secrets",
                multiple=True,
                metavar="NAME[@HOST,...]",
                help="A secret from this shell's environment variable NAME: the sandbox sees a placeholder, "
                "HTTPS requests to HOSTs (default: the --allow-out names) get the value; repeatable.",
            ),
        ]
    ):
        fn = decorator(fn)
    return fn


def secrets_from(items: tuple[str, ...]) -> dict[str, Any]:
    """``--secret NAME[@HOST,...]``: the value comes from the environment, so it is in no command line."""
    out: dict[str, Any] = {}
    for item in items:
        name, _, hosts = item.partition("@")
        value = os.environ.get(name)
        if not value:
            raise click.BadParameter(
                f"set the environment variable {name} to the secret's value", param_hint="--secret"
            )
        out[name] = {"value": value, "hosts": [h for h in hosts.split(",") if h]} if hosts else value
    return out


def exec_options(fn: F) -> F:
    for decorator in reversed(
        [
            click.option("--env", "-e", multiple=True, metavar="KEY=VALUE", help="Environment variable."),
            click.option("--cwd", default=None, help="Working directory inside the sandbox."),
            click.option(
                "--user",
                type=click.Choice(["user", "root"]),
                default=None,
                help="Run as the unprivileged 'user' (default) or as root.",
            ),
            click.option(
                "--command-timeout", type=float, default=None, help="Kill the command after N seconds."
            ),
        ]
    ):
        fn = decorator(fn)
    return fn


def network_options() -> list[Callable[[F], F]]:
    return [
        click.option(
            "--network",
            type=click.Choice(["none", "internet"]),
            default=None,
            help="Egress: none (default, no network) or internet (public addresses only).",
        ),
        click.option(
            "--allow-out",
            multiple=True,
            metavar="RULE",
            help="Allow only these destinations: host name, *.wildcard or CIDR, with optional :port; repeatable.",
        ),
        click.option(
            "--deny-out",
            multiple=True,
            metavar="RULE",
            help="Never these destinations (same forms); repeatable.",
        ),
    ]


def network_from(opts: dict[str, Any]) -> str | dict[str, Any] | None:
    """The policy the --network/--allow-out/--deny-out options describe (None: none given)."""
    allow, deny, mode = opts.get("allow_out") or (), opts.get("deny_out") or (), opts.get("network")
    if not allow and not deny:
        return mode
    if mode == "none":
        raise click.UsageError("--network none cannot be combined with --allow-out/--deny-out")
    rules: dict[str, Any] = {"deny_out": list(deny)}
    if allow or mode is None:
        rules["allow_out"] = list(allow)
    return rules


def sandbox_kwargs(opts: dict[str, Any]) -> dict[str, Any]:
    return {
        "network": network_from(opts),
        "isolation": opts.get("isolation"),
        "template": opts.get("template"),
        "timeout": opts.get("sandbox_timeout"),
        "memory_mb": opts.get("memory_mb"),
        "cpus": opts.get("cpus"),
        "metadata": key_values(opts.get("metadata", ()), "--metadata"),
        "envs": key_values(opts.get("sandbox_env", ()), "--sandbox-env"),
        "secrets": secrets_from(opts.get("secrets", ())),
    }


def exec_params_from(command: tuple[str, ...], opts: dict[str, Any]) -> ExecParams:
    argv = list(command)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise click.UsageError("give the command to run after --")
    return ExecParams(
        argv=argv,
        env=key_values(opts.get("env", ()), "--env"),
        cwd=opts.get("cwd"),
        user=opts.get("user"),
        timeout=opts.get("command_timeout"),
    )


@contextlib.contextmanager
def open_sandbox(opts: dict[str, Any]) -> Iterator[Sandbox]:
    """A new sandbox for the duration of the block, killed afterwards."""
    with progress("Starting sandbox…"):
        sbx = Sandbox.create(**sandbox_kwargs(opts))
    with sbx:
        yield sbx


def stream_command(sbx: Sandbox, params: ExecParams) -> int:
    """Run ``params`` in ``sbx`` with its output copied to ours as it comes; returns the shell-style status."""
    events = sbx.commands.stream(
        params.argv or [], envs=params.env, cwd=params.cwd, user=params.user, timeout=params.timeout
    )
    return exit_status(stream_events(events))
