"""Rotating a home's at-rest key: every sealed file and column sealed again under a new key.

The rotation is crash-safe and resumable. It first records ``rotating_to: <new id>`` in the
home's config; from then on the home opens only for the rotation, which reads under either key
and writes under the new one. Each file is replaced atomically (a temporary file, then
`os.replace`) and each table's rows in one transaction; a value already under the new key is
skipped, so a rerun after a crash finishes what is left. Only then does the config switch to
the new key id (the last step): the old key is refused from that moment.

What is sealed is found by its header (`aipipe.secure.at_rest.MAGIC`), not by a list of file
names, so a file added by a later version, or a home moved aside by `init --force`, is rotated
too; the SQLite columns are named by the store that seals them. A file sealed under neither key
(a home moved aside by `init --force` that had a key of its own) is left as it is and reported.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from aipipe.errors import AtRestKeyError
from aipipe.secure.at_rest import MAGIC, AtRest, AtRestConfig, AtRestKey, sealed_key_id
from aipipe.store.sqlite import immediate


@dataclass(frozen=True)
class Rotation:
    """What a finished rotation did: key ids, how many files and rows it sealed again, and the
    files it left alone because neither key opens them."""

    old_key_id: str
    new_key_id: str
    files: int
    rows: int
    skipped: tuple[str, ...] = ()


def begin(what: str, setting: AtRestConfig | None, old: AtRestKey, new: AtRestKey) -> AtRest:
    """Check that `old` is the home's key and `new` a different one (or the one an unfinished
    rotation was moving to); the `AtRest` the rotation reads and writes with."""
    if setting is None:
        raise AtRestKeyError(
            f"{what} is not encrypted at rest: there is no key to rotate (a home is encrypted "
            "from init: --at-rest-key-file)"
        )
    if old.key_id != setting.key_id:
        raise AtRestKeyError(
            f"{what} is encrypted under at-rest key {setting.key_id}, but the current key given "
            f"is {old.key_id}; give the current key (--at-rest-key-file) and the new one "
            "(--new-key-file)"
        )
    if new.key_id == old.key_id:
        raise AtRestKeyError(f"the new at-rest key is the current one ({old.key_id}); make a new "
                             "one: aipipe keygen at-rest FILE")  # fmt: skip
    if setting.rotating_to not in (None, new.key_id):
        raise AtRestKeyError(
            f"{what} has an unfinished rotation to at-rest key {setting.rotating_to}, not "
            f"{new.key_id}; finish that one first with its key file"
        )
    return AtRest(new, also=(old,))


def rotate(
    what: str,
    setting: AtRestConfig | None,
    old: AtRestKey,
    new: AtRestKey,
    *,
    save: Callable[[AtRestConfig], None],
    reseal: Callable[[AtRest, list[Path]], tuple[int, int]],
) -> Rotation:
    """Rotate a home from `old` to `new`: `save` writes the home's `at_rest` setting, `reseal`
    seals its files and rows again with the `AtRest` given (adding the files it leaves alone to
    the list) and returns (files, rows)."""
    at_rest = begin(what, setting, old, new)
    save(AtRestConfig(key_id=old.key_id, rotating_to=new.key_id))
    skipped: list[Path] = []
    files, rows = reseal(at_rest, skipped)
    save(AtRestConfig(key_id=new.key_id))
    return Rotation(old.key_id, new.key_id, files, rows, tuple(map(str, skipped)))


def reseal_files(root: Path, at_rest: AtRest, skipped: list[Path] | None = None) -> int:
    """Seal again, under `at_rest`'s key, every sealed file under `root`; how many changed. A
    file under a key `at_rest` does not hold is left alone and added to `skipped`."""
    changed = 0
    for path in sorted(root.rglob("*")):
        if path.is_symlink() or not path.is_file() or not _starts_sealed(path):
            continue
        data = path.read_bytes()
        if not at_rest.holds(sealed_key_id(data)):
            if skipped is not None:
                skipped.append(path)
            continue
        fresh = at_rest.reseal(data, where=str(path))
        if fresh is None:
            continue
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.rekey")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(fresh)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        changed += 1
    return changed


def _starts_sealed(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(len(MAGIC)) == MAGIC


def reseal_columns(
    conn: sqlite3.Connection, columns: Sequence[tuple[str, str]], at_rest: AtRest
) -> int:
    """Seal again every sealed value of the (table, column)s that exist; how many changed.
    Each column in one transaction; rows found by their primary key (or rowid)."""
    changed = 0
    for table, column in columns:
        key = _row_key(conn, table)
        if key is None:
            continue
        keys = ", ".join(f"[{k}]" for k in key)
        match = " AND ".join(f"[{k}] = ?" for k in key)
        with immediate(conn):
            rows = conn.execute(
                f"SELECT {keys}, [{column}] FROM [{table}] WHERE typeof([{column}]) = 'blob' "
                f"AND substr([{column}], 1, ?) = ?",
                (len(MAGIC), MAGIC),
            ).fetchall()
            for *where, value in rows:
                fresh = at_rest.reseal(value, where=f"{table}.{column} of {tuple(where)}")
                if fresh is not None:
                    conn.execute(
                        f"UPDATE [{table}] SET [{column}] = ? WHERE {match}", (fresh, *where)
                    )
                    changed += 1
    return changed


def _row_key(conn: sqlite3.Connection, table: str) -> list[str] | None:
    """The primary key columns of `table` (["rowid"] for a table without one); None if there
    is no such table."""
    info = conn.execute(f"PRAGMA table_info([{table}])").fetchall()
    if not info:
        return None
    key = [name for _, name, _, _, _, pk in sorted(info, key=lambda c: c[5]) if pk]
    return key or ["rowid"]
