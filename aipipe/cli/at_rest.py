"""The at-rest key at the CLI edge, and `aipipe keygen at-rest`.

A home encrypted at rest needs its key on every command that opens it. The key comes from
`--at-rest-key-file FILE` (on `node init`/`hub init`, or before the command: `aipipe node
--at-rest-key-file FILE status ...`), else `AIPIPE_AT_REST_KEY_FILE`, else the key itself in
`AIPIPE_AT_REST_KEY` (base64 or hex, for a secret manager that injects values, not files). The
library never reads the environment: the key is read here and passed down.
"""

from __future__ import annotations

import os
from contextvars import ContextVar
from pathlib import Path

import typer

from aipipe.cli.render import console, emit_json, kv_table
from aipipe.errors import AtRestKeyError
from aipipe.hub.hub import Hub
from aipipe.node.home import rekey_node
from aipipe.secure.at_rest import SUPPLY, AtRestKey
from aipipe.secure.rekey import Rotation

KEY_ENV = "AIPIPE_AT_REST_KEY"
FILE_ENV = "AIPIPE_AT_REST_KEY_FILE"
# The --at-rest-key-file given before the command, for this invocation: the root callback
# (which runs first on every invocation) sets it, so nothing carries over from a previous one.
_GIVEN: ContextVar[Path | None] = ContextVar("aipipe_at_rest_key_file", default=None)

KEY_FILE = typer.Option(
    None,
    "--at-rest-key-file",
    envvar=FILE_ENV,
    help="The home's at-rest key (a 0600 file holding 32 bytes, base64 or hex; "
    "`aipipe keygen at-rest FILE` makes one). Or set AIPIPE_AT_REST_KEY to the key itself.",
)

app = typer.Typer(help="Make keys: `aipipe keygen at-rest FILE`.", no_args_is_help=True)


def remember_key_file(path: Path | None, *, root: bool = False) -> None:
    """For a group's callback: keep the --at-rest-key-file it was given for its command (the
    root's resets what an earlier invocation in this process kept)."""
    if root or path is not None:
        _GIVEN.set(path)


def at_rest_key(path: Path | None = None) -> AtRestKey | None:
    """The at-rest key: from `path`, the --at-rest-key-file given before the command (or its
    environment variable), or AIPIPE_AT_REST_KEY; None when none is given."""
    chosen = path or _GIVEN.get()
    if chosen is not None:
        return AtRestKey.from_file(chosen)
    text = os.environ.get(KEY_ENV)
    if text:
        return AtRestKey.from_text(text, source=KEY_ENV)
    return None


@app.command("at-rest")
def keygen_at_rest(
    path: Path = typer.Argument(..., help="The key file to create (mode 0600, never replaced)."),
) -> None:
    """Create a random 256-bit at-rest key in PATH (mode 0600) and print its id. Keep a copy
    where you keep secrets (a secret manager, a Kubernetes Secret), never in the home."""
    key = AtRestKey.generate()
    key.write(path)
    console.print(f"[green]✓[/] at-rest key {key.key_id} written to {path} (mode 0600)")


HOME = typer.Option(..., "--home", help="The home directory.")
NEW_KEY = typer.Option(
    ..., "--new-key-file", help="The new at-rest key (0600; `aipipe keygen at-rest FILE`)."
)
JSON = typer.Option(False, "--json", help="Print machine-readable JSON instead of tables.")


def _keys(new_key_file: Path) -> tuple[AtRestKey, AtRestKey]:
    old = at_rest_key()
    if old is None:
        raise AtRestKeyError(f"rekey needs the home's current at-rest key; {SUPPLY}")
    return old, AtRestKey.from_file(new_key_file)


def _show(kind: str, home: Path, done: Rotation, as_json: bool) -> None:
    info = {"home": str(home), "old_key_id": done.old_key_id, "new_key_id": done.new_key_id,
            "files": done.files, "rows": done.rows, "skipped": list(done.skipped)}  # fmt: skip
    if as_json:
        emit_json(info)
        return
    console.print(f"[green]✓[/] {kind} home sealed again under at-rest key {done.new_key_id}")
    console.print(kv_table("rekey", {k: v for k, v in info.items() if k != "skipped"}))
    for path in done.skipped:
        console.print(f"[yellow]![/] left as it is, sealed under neither key: {path}")
    console.print("the old key no longer opens this home: retire it after your next backup")


def node_rekey(home: Path = HOME, new_key_file: Path = NEW_KEY, as_json: bool = JSON) -> None:
    """Seal every private file and PHI column of the node home again under a new at-rest key
    (the current one from --at-rest-key-file or the environment). Stop the node first; a rerun
    after a crash finishes the rotation."""
    old, new = _keys(new_key_file)
    _show("node", home, rekey_node(home, old, new), as_json)


def hub_rekey(home: Path = HOME, new_key_file: Path = NEW_KEY, as_json: bool = JSON) -> None:
    """Seal the hub home's model blobs and private keys again under a new at-rest key (the
    current one from --at-rest-key-file or the environment). Refused while `hub serve` runs;
    a rerun after a crash finishes the rotation."""
    old, new = _keys(new_key_file)
    _show("hub", home, Hub.rekey(home, old, new), as_json)


def _group(at_rest_key_file: Path = KEY_FILE) -> None:
    remember_key_file(at_rest_key_file)


def register(node_app: typer.Typer, hub_app: typer.Typer) -> None:
    """Add `rekey` to the `node` and `hub` groups, and --at-rest-key-file before their
    commands (`aipipe node --at-rest-key-file FILE status --home ...`)."""
    node_app.command("rekey")(node_rekey)
    hub_app.command("rekey")(hub_rekey)
    for group in (node_app, hub_app):
        group.callback()(_group)
