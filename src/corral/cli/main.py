"""The ``corral`` command line: a thin layer over the SDK.

Errors are Corral's typed errors, printed as one actionable line (no traceback); ``--debug`` shows the
traceback for bug reports. Exit codes: 0 ok, 1 error, 2 usage, and for ``run``/``exec`` the command's own code.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import click
from rich.markup import escape

from corral.cli import certs as certs_cmd
from corral.cli import code as code_cmd
from corral.cli import files as files_cmd
from corral.cli import mcp_cmd
from corral.cli import pools as pools_cmd
from corral.cli import ports as ports_cmd
from corral.cli import sandbox as sandbox_cmd
from corral.cli import server as server_cmd
from corral.cli import shell as shell_cmd
from corral.cli import templates as templates_cmd
from corral.cli._common import create_options, exec_options, exec_params_from, open_sandbox, stream_command
from corral.cli._output import emit_json, err_console
from corral.errors import CorralError

__all__ = ["cli", "main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.version_option(package_name="corral")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Corral: sandboxes for AI agents (namespaces, gVisor) on this host."""
    ctx.obj = {"debug": debug}
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
    )


@cli.command(context_settings={"ignore_unknown_options": True})
@create_options
@exec_options
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON instead of streaming it.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def run(command: tuple[str, ...], as_json: bool, **opts: Any) -> None:
    """Run COMMAND in a new sandbox, stream its output, and remove the sandbox.

    Example: corral run --isolation gvisor -- python3 -c 'print(1)'
    """
    params = exec_params_from(command, opts)
    with open_sandbox(opts) as sbx:
        if as_json:
            result = sbx.commands.run(
                params.argv or [], envs=params.env, cwd=params.cwd, user=params.user, timeout=params.timeout
            )
            emit_json({"sandbox_id": sbx.sandbox_id, **result.__dict__})
            code = result.exit_code if result.exit_code is not None else 1
        else:
            code = stream_command(sbx, params)
    sys.exit(code)


@cli.command()
@click.option(
    "--isolation",
    "isolations",
    multiple=True,
    default=("namespace", "gvisor"),
    show_default=True,
    help="Isolation levels to demonstrate.",
)
def demo(isolations: tuple[str, ...]) -> None:
    """Create a sandbox per isolation level, run code and move files in and out, and print what happened."""
    from corral.cli.demo import run_demo

    sys.exit(run_demo(list(isolations)))


cli.add_command(sandbox_cmd.sandbox)
cli.add_command(files_cmd.files)
cli.add_command(templates_cmd.template)
cli.add_command(server_cmd.serve)
cli.add_command(server_cmd.tenants)
cli.add_command(server_cmd.keys)
cli.add_command(server_cmd.audit)
cli.add_command(certs_cmd.certs)
cli.add_command(code_cmd.run_code)
templates_cmd.template.add_command(code_cmd.build_code_interpreter)
sandbox_cmd.sandbox.add_command(ports_cmd.forward)
cli.add_command(mcp_cmd.mcp)
cli.add_command(pools_cmd.pool)
sandbox_cmd.sandbox.add_command(shell_cmd.shell)
files_cmd.files.add_command(shell_cmd.watch)


def main(argv: list[str] | None = None) -> None:
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        cli.main(args=argv, prog_name="corral", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except CorralError as exc:
        if debug:
            raise
        err_console.print(
            f"[bold red]error:[/bold red] {escape(exc.message)}"
        )  # messages may hold [brackets]
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
