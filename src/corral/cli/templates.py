"""``corral template …``: list, build, import (directory or tarball) and delete templates."""

from __future__ import annotations

import click
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn

from corral.cli._output import emit_json, err_console, progress, table
from corral.client._sync.templates import Templates
from corral.models import BuildEvent, BuildEventKind

__all__ = ["template"]


@click.group()
def template() -> None:
    """Manage the root file systems sandboxes start from."""


@template.command(name="list")
@click.option("--json", "as_json", is_flag=True)
def list_(as_json: bool) -> None:
    with Templates() as templates:
        found = templates.list()
    if as_json:
        emit_json(found)
    else:
        table(["NAME", "KIND", "DESCRIPTION"], [[t.name, t.kind, t.description] for t in found])


@template.command(name="import")
@click.argument("name")
@click.option(
    "--dir", "directory", type=click.Path(exists=True, file_okay=False), help="A root file system tree."
)
@click.option("--tar", "tarball", type=click.Path(exists=True, dir_okay=False), help="A tar archive of one.")
@click.option("--description", default="")
def import_(name: str, directory: str | None, tarball: str | None, description: str) -> None:
    """Make NAME usable as `--template NAME`, from --dir or --tar."""
    if (directory is None) == (tarball is None):
        raise click.UsageError("give exactly one of --dir and --tar")
    with Templates() as templates, progress(f"Importing template {name}…"):
        if directory is not None:
            templates.import_directory(name, directory, description=description)
        else:
            assert tarball is not None
            templates.import_tarball(name, tarball, description=description)
    click.echo(name)


@template.command()
@click.argument("name")
def delete(name: str) -> None:
    with Templates() as templates:
        templates.delete(name)


@template.command()
@click.argument("name")
@click.option("--from", "source", required=True, help="Image ref, ./dir, ./rootfs.tar or debootstrap:SUITE.")
@click.option("--run", "steps", multiple=True, help="A shell step run (no network) on top; repeatable.")
@click.option("--env", "envs", multiple=True, metavar="K=V", help="Environment for steps and sandboxes.")
@click.option("--workdir", default=None, help="Working directory of steps and sandboxes.")
@click.option(
    "--user", type=click.Choice(["root", "user"]), default=None, help="Who runs steps and commands."
)
@click.option("--start-cmd", default=None, help="Started in the background in every new sandbox.")
@click.option("--ready-cmd", default=None, help="Must exit 0 before a new sandbox is handed out.")
@click.option("--registry-user", envvar="CORRAL_REGISTRY_USER", default=None)
@click.option("--registry-password", envvar="CORRAL_REGISTRY_PASSWORD", default=None)
@click.option("--insecure-registry", is_flag=True, help="Allow plain HTTP / unverified TLS to the registry.")
@click.option("--isolation", default=None, help="Runtime that runs the --run steps (namespace, gvisor).")
@click.option("--description", default="")
def build(
    name: str,
    source: str,
    steps: tuple[str, ...],
    envs: tuple[str, ...],
    workdir: str | None,
    user: str | None,
    start_cmd: str | None,
    ready_cmd: str | None,
    registry_user: str | None,
    registry_password: str | None,
    insecure_registry: bool,
    isolation: str | None,
    description: str,
) -> None:
    """Build template NAME from an image, a directory, a tarball or debootstrap, plus --run steps."""
    env = {}
    for item in envs:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.UsageError(f"--env takes KEY=VALUE, not {item!r}")
        env[key] = value
    with Templates() as templates, _BuildProgress(len(steps)) as bar:
        templates.build(
            name,
            source,
            run=steps,
            env=env,
            workdir=workdir,
            user=user,
            start_cmd=start_cmd,
            ready_cmd=ready_cmd,
            registry_username=registry_user,
            registry_password=registry_password,
            insecure_registry=insecure_registry,
            isolation=isolation,
            description=description,
            on_progress=bar.update,
        )
    click.echo(name)


class _BuildProgress:
    """A rich progress bar over layers and steps on a terminal; one line per event otherwise."""

    def __init__(self, steps: int) -> None:
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            console=err_console,
            transient=False,
        )
        self._task = self._progress.add_task("pulling", total=None)
        self._steps = steps
        self._live = err_console.is_terminal

    def __enter__(self) -> _BuildProgress:
        if self._live:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live:
            self._progress.stop()

    def update(self, event: BuildEvent) -> None:
        if event.kind is BuildEventKind.LOG:
            line = event.data.rstrip("\n")
            if line:
                (self._progress.console if self._live else err_console).print(
                    f"[dim]{line}[/dim]", markup=True
                )
            return
        text = event.message
        if event.kind is BuildEventKind.STEP:
            text = f"step {event.step}/{event.total_steps}: {event.message}"
            self._progress.update(self._task, total=event.total_steps, completed=(event.step or 1) - 1)
        elif event.kind is BuildEventKind.LAYER and event.step is not None:
            self._progress.update(self._task, completed=event.step)
        elif event.kind is BuildEventKind.DONE:
            self._progress.update(self._task, total=max(self._steps, 1), completed=max(self._steps, 1))
        self._progress.update(self._task, description=text)
        if not self._live:
            err_console.print(f"{event.kind.value}: {text}", markup=False)
