"""``corral template …``: list, import (directory or tarball) and delete templates."""

from __future__ import annotations

import click

from corral.cli._output import emit_json, progress, table
from corral.client._sync.templates import Templates

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
