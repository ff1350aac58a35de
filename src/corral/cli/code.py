"""``corral run-code`` (a cell in the code interpreter) and ``corral template build-code-interpreter``.

Output streams as the cell runs; results follow: the text of each result, figures saved as files under
``--save-dir`` (or summarised), and the error's traceback on stderr with exit status 1.
"""

from __future__ import annotations

import base64
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from corral.cli._common import create_options, open_sandbox
from corral.cli._output import emit_json, progress
from corral.client._sync.sandbox import Sandbox
from corral.client._sync.templates import Templates
from corral.models import Execution, OutputMessage, Result

__all__ = ["build_code_interpreter", "run_code"]

_BINARY = {"png": "png", "jpeg": "jpg", "pdf": "pdf"}
_TEXT = {"svg": "svg", "html": "html"}


@contextlib.contextmanager
def _sandbox(sandbox_id: str | None, opts: dict[str, Any]) -> Iterator[Sandbox]:
    if sandbox_id is not None:
        sbx = Sandbox.connect(sandbox_id)
        try:
            yield sbx
        finally:
            sbx.close()
        return
    opts = {**opts, "template": opts.get("template") or "code-interpreter"}
    with open_sandbox(opts) as sbx:
        yield sbx


def _save(result: Result, index: int, save_dir: Path | None) -> list[str]:
    """Write the result's images/documents to files; returns one line per representation not printed."""
    lines = []
    for field, ext in (*_BINARY.items(), *_TEXT.items()):
        value = getattr(result, field)
        if value is None or (field == "html" and result.text):
            continue
        if save_dir is None:
            lines.append(f"[{field}: {len(value)} characters; use --save-dir DIR to save it]")
            continue
        save_dir.mkdir(parents=True, exist_ok=True)
        path = save_dir / f"result-{index}.{ext}"
        if field in _BINARY:
            path.write_bytes(base64.b64decode(value))
        else:
            path.write_text(value)
        lines.append(f"[{field} saved to {path}]")
    return lines


@click.command(name="run-code")
@click.argument("code")
@click.option(
    "--language", "-l", default=None, help="python (default), javascript (js) or bash; not with --context."
)
@click.option("--sandbox", "sandbox_id", default=None, help="Run in this running sandbox (keeps state).")
@click.option("--context", "context_id", default=None, help="Run in this code context of --sandbox.")
@click.option("--code-timeout", type=float, default=300.0, show_default=True, help="Interrupt after N s.")
@click.option("--save-dir", type=click.Path(file_okay=False, path_type=Path), default=None)
@click.option("--json", "as_json", is_flag=True, help="Print the whole execution as JSON at the end.")
@create_options
def run_code(
    code: str,
    language: str | None,
    sandbox_id: str | None,
    context_id: str | None,
    code_timeout: float,
    save_dir: Path | None,
    as_json: bool,
    **opts: Any,
) -> None:
    """Run CODE ('-' reads it from stdin) in the code interpreter and print output and results.

    Without --sandbox a new sandbox from the code-interpreter template runs it and is removed afterwards.
    Example: corral run-code --sandbox sb-… 'x = 41'; corral run-code --sandbox sb-… 'x + 1'
    """
    if code == "-":
        code = sys.stdin.read()
    if context_id is not None and sandbox_id is None:
        raise click.UsageError("--context needs --sandbox (contexts live in a running sandbox)")

    def out(message: OutputMessage) -> None:
        if not as_json:
            click.echo(message.line, nl=False)

    def err(message: OutputMessage) -> None:
        if not as_json:
            click.echo(message.line, nl=False, err=True)

    with _sandbox(sandbox_id, opts) as sbx:
        execution: Execution = sbx.run_code(
            code,
            language=language,
            context=context_id,
            on_stdout=out,
            on_stderr=err,
            timeout=code_timeout,
        )
        if as_json:
            emit_json({"sandbox_id": sbx.sandbox_id, "text": execution.text, **execution.__dict__})
        else:
            for index, result in enumerate(execution.results):
                if result.text is not None:
                    click.echo(result.text)
                for line in _save(result, index, save_dir):
                    click.echo(line)
            if execution.error is not None:
                click.echo(execution.error.traceback or execution.error.value, err=True)
                click.echo(f"{execution.error.name}: {execution.error.value}", err=True)
    sys.exit(1 if execution.error is not None else 0)


@click.command(name="build-code-interpreter")
@click.option("--name", default="code-interpreter", show_default=True)
def build_code_interpreter(name: str) -> None:
    """Build (once, cached) the template with IPython, Node and Bash kernels, pandas and matplotlib."""
    with Templates() as templates, progress(f"Building template {name} (pip)…"):
        info = templates.build_code_interpreter(name)
    click.echo(info.name)
