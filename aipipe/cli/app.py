"""`aipipe`: assembles the command groups; each group lives in its own module."""

from __future__ import annotations

from pathlib import Path

import typer

from aipipe import __version__
from aipipe.cli import at_rest, audit, backup, hub, model, node, people, privacy, study, train
from aipipe.cli.render import AipipeGroup

app = typer.Typer(
    name="aipipe",
    cls=AipipeGroup,
    help="Federated learning for hospitals: patient data never leaves the node.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(node.app, name="node")
app.add_typer(hub.app, name="hub")
app.add_typer(study.app, name="study")
app.add_typer(train.app, name="train")
app.add_typer(model.app, name="model")
app.add_typer(privacy.app, name="privacy")
app.add_typer(audit.app, name="audit")
app.add_typer(at_rest.app, name="keygen")
backup.register(node.app, hub.app)
people.register(hub.app, app)
at_rest.register(node.app, hub.app)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"aipipe {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    at_rest_key_file: Path = at_rest.KEY_FILE,
) -> None:
    """Federated learning for hospitals: patient data never leaves the node."""
    at_rest.remember_key_file(at_rest_key_file, root=True)


def main() -> None:
    app()
