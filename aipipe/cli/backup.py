"""`aipipe node backup|restore` and `aipipe hub backup|restore`: a home as one verified archive.

The archive format and its checks are `aipipe.backup`; here each command audits itself in the
home's own log: ``backup.create`` (with the archive's sha256) in the home backed up, and
``backup.restore`` in the restored home.
"""

from __future__ import annotations

import getpass
from pathlib import Path

import typer

from aipipe.backup import BackupResult, Kind, RestoreResult, create_backup, restore_backup
from aipipe.cli.at_rest import at_rest_key
from aipipe.cli.options import JSON
from aipipe.cli.render import console, emit_json, kv_table
from aipipe.errors import AipipeError
from aipipe.hub.hub import Hub
from aipipe.node.node import Node

OUT = typer.Option(..., "--out", help="The archive to write (.tar.gz, mode 0600).")
FROM = typer.Option(..., "--from", help="The archive written by `backup`.")
FORCE = typer.Option(
    False, "--force", help="Restore over a non-empty home: it is moved aside, never deleted."
)


def _actor() -> str:
    try:
        return f"user:{getpass.getuser()}"
    except (KeyError, OSError):  # no login name in this environment (a bare container)
        return "user:unknown"


def _owner(kind: Kind, home: Path) -> Node | Hub:
    """The home as its node or hub opens it (its audit log with its own key and owner)."""
    key = at_rest_key()
    return Node.open(home, at_rest_key=key) if kind == "node" else Hub.open(home, at_rest_key=key)


def _backup(kind: Kind, home: Path, out: Path, as_json: bool) -> None:
    with _owner(kind, home) as owner:
        audit = owner.audit
        try:
            result = create_backup(home, out, kind=kind)
        except AipipeError as exc:
            audit.append("backup.create", actor=_actor(), resource=f"{kind}-home",
                         outcome="failure", details={"error": type(exc).__name__})  # fmt: skip
            raise
        audit.append(
            "backup.create",
            actor=_actor(),
            resource=f"{kind}-home",
            details={"archive_sha256": result.sha256, "files": len(result.files)},
        )
    _show_backup(result, as_json)


def _show_backup(result: BackupResult, as_json: bool) -> None:
    info = {
        "archive": str(result.archive),
        "sha256": result.sha256,
        "files": len(result.files),
        "sqlite_snapshots": sum(entry.sqlite for entry in result.files),
        "skipped": list(result.skipped),
    }
    if as_json:
        emit_json(info)
        return
    console.print(f"[green]✓[/] {result.kind} home backed up")
    console.print(kv_table("backup", info))


def _restore(kind: Kind, home: Path, archive: Path, force: bool, as_json: bool) -> None:
    result = restore_backup(archive, home, kind=kind, force=force)
    with _owner(kind, home) as owner:
        owner.audit.append(
            "backup.restore",
            actor=_actor(),
            resource=f"{kind}-home",
            details={
                "archive_sha256": result.sha256,
                "backup_created": result.created,
                "files": result.files,
                "moved_aside": None if result.moved_aside is None else str(result.moved_aside),
            },
        )
    _show_restore(result, as_json)


def _show_restore(result: RestoreResult, as_json: bool) -> None:
    info = {
        "home": str(result.home),
        "archive_sha256": result.sha256,
        "backup_created": result.created,
        "files": result.files,
        "moved_aside": None if result.moved_aside is None else str(result.moved_aside),
    }
    if as_json:
        emit_json(info)
        return
    console.print(f"[green]✓[/] {result.kind} home restored; check it with: aipipe audit verify")
    console.print(kv_table("restore", info))


def node_backup(
    home: Path = typer.Option(..., "--home", help="The node home directory."),
    out: Path = OUT,
    as_json: bool = JSON,
) -> None:
    """Back up a node home (SQLite files via SQLite's online backup: safe while it runs)."""
    _backup("node", home, out, as_json)


def node_restore(
    home: Path = typer.Option(..., "--home", help="The node home to restore into."),
    archive: Path = FROM,
    force: bool = FORCE,
    as_json: bool = JSON,
) -> None:
    """Restore a node home from a backup, every file checked against its manifest first."""
    _restore("node", home, archive, force, as_json)


def hub_backup(
    home: Path = typer.Option(..., "--home", help="The hub home directory."),
    out: Path = OUT,
    as_json: bool = JSON,
) -> None:
    """Back up a hub home (SQLite files via SQLite's online backup: safe while it serves)."""
    _backup("hub", home, out, as_json)


def hub_restore(
    home: Path = typer.Option(..., "--home", help="The hub home to restore into."),
    archive: Path = FROM,
    force: bool = FORCE,
    as_json: bool = JSON,
) -> None:
    """Restore a hub home from a backup, every file checked against its manifest first."""
    _restore("hub", home, archive, force, as_json)


def register(node_app: typer.Typer, hub_app: typer.Typer) -> None:
    """Add the backup and restore commands to the `node` and `hub` groups."""
    node_app.command("backup")(node_backup)
    node_app.command("restore")(node_restore)
    hub_app.command("backup")(hub_backup)
    hub_app.command("restore")(hub_restore)
