"""The audit log's SQLite file: its schema, the connection, explicit transactions, and a
consistent read of an existing log (`read_snapshot`, what verify and export work on).

Triggers refuse UPDATE and DELETE so that no aipipe code path can alter history by mistake; they
are no defence against someone who can drop them, which is what `aipipe.audit.verify` is for.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aipipe.audit.events import CHECKPOINT_FIELDS, EVENT_FIELDS, Checkpoint
from aipipe.errors import ConfigError, StoreError
from aipipe.store.sqlite import private_db

SCHEMA_VERSION = 1
_BUSY_TIMEOUT_S = 30.0

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS events (
        seq INTEGER PRIMARY KEY,
        time TEXT NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        resource TEXT NOT NULL,
        outcome TEXT NOT NULL CHECK (outcome IN ('success', 'failure', 'refused')),
        details TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS checkpoints (
        seq INTEGER PRIMARY KEY,
        hash TEXT NOT NULL,
        time TEXT NOT NULL,
        public_key TEXT NOT NULL,
        signature TEXT NOT NULL
    )""",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    *(
        f"""CREATE TRIGGER IF NOT EXISTS {table}_no_{verb} BEFORE {verb.upper()} ON {table}
        BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END"""
        for table in ("events", "checkpoints")
        for verb in ("update", "delete")
    ),
)


def connect(path: Path) -> sqlite3.Connection:
    private_db(path)  # 0600 from the first byte; -wal and -shm take its mode
    try:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves (BEGIN IMMEDIATE for appends).
        conn = sqlite3.connect(
            path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open audit log {path}: {exc}") from exc
    return conn


def _rollback(conn: sqlite3.Connection) -> None:
    # SQLite may already have rolled back (SQLITE_FULL, SQLITE_IOERR); the first error is the news.
    with suppress(sqlite3.Error):
        conn.execute("ROLLBACK")


@contextmanager
def transaction(conn: sqlite3.Connection, path: Path, mode: str) -> Iterator[sqlite3.Connection]:
    try:
        conn.execute(f"BEGIN {mode}")
    except sqlite3.Error as exc:
        raise StoreError(f"audit log {path} is locked or unreadable: {exc}") from exc
    try:
        yield conn
    except sqlite3.Error as exc:
        _rollback(conn)
        raise StoreError(f"audit log {path} cannot be used: {exc}") from exc
    except BaseException:
        _rollback(conn)
        raise
    try:
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        _rollback(conn)
        raise StoreError(f"cannot commit to audit log {path}: {exc}") from exc


def check_schema(conn: sqlite3.Connection, path: Path) -> str | None:
    """Refuse a log from a newer aipipe; return the recorded owner name."""
    rows = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    version = int(rows.get("schema_version", SCHEMA_VERSION))
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"audit log {path} has schema {version}, newer than this aipipe's {SCHEMA_VERSION}; "
            "upgrade aipipe"
        )
    return rows.get("owner")


@dataclass
class LogSnapshot:
    """A consistent read of a log (one read transaction): what verify and export work on."""

    path: Path
    owner: str | None
    checkpoints: list[Checkpoint]
    _conn: sqlite3.Connection

    def event_rows(self) -> Iterator[dict[str, Any]]:
        """Stored rows in seq order, ``details`` as the stored text, unjudged."""
        columns = ", ".join(EVENT_FIELDS)
        for row in self._conn.execute(f"SELECT {columns} FROM events ORDER BY seq"):
            yield dict(row)


@contextmanager
def read_snapshot(path: Path) -> Iterator[LogSnapshot]:
    """Open an existing log read-only in spirit (no writes) inside one read transaction."""
    if not path.is_file():
        raise ConfigError(f"no audit log at {path}; pass the --home of a node or hub")
    conn = connect(path)
    try:
        with transaction(conn, path, "DEFERRED"):
            try:
                owner = check_schema(conn, path)
                columns = ", ".join(CHECKPOINT_FIELDS)
                rows = conn.execute(f"SELECT {columns} FROM checkpoints ORDER BY seq").fetchall()
            except sqlite3.Error as exc:
                raise StoreError(f"{path} is not an aipipe audit log: {exc}") from exc
            checkpoints = [Checkpoint.from_dict(dict(row)) for row in rows]
            yield LogSnapshot(path, owner, checkpoints, conn)
    finally:
        conn.close()
