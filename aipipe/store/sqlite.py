"""What both SQLite stores share: an explicit write transaction, and files only their owner
can read; `Tables`, the base of the hub store's parts."""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

PRIVATE_FILE = 0o600
_SIDE_FILES = ("-wal", "-shm", "-journal")


def private_db(path: Path) -> None:
    """Create the database file 0600 before SQLite opens it, and tighten one made looser.

    SQLite gives its -wal, -shm and -journal files the main file's mode, so they follow; any
    that exist already are tightened too. A path that cannot be changed is left to `connect`
    to report."""
    with contextlib.suppress(FileExistsError, OSError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE))
    for file in (path, *(path.with_name(path.name + side) for side in _SIDE_FILES)):
        with contextlib.suppress(OSError):
            if file.stat().st_mode & 0o077:
                file.chmod(PRIVATE_FILE)


@contextmanager
def immediate(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE … COMMIT, rolled back on any exception: takes the write lock up front so
    two processes cannot both read-then-write the same rows."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


class Tables:
    """Some tables on one connection, with its write transaction: `HubStore` is made of these."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        return immediate(self.conn)
