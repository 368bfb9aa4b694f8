"""`AuditLog`: the append-only, hash-chained event table of one node or hub (``audit.sqlite``).

Each append runs in a ``BEGIN IMMEDIATE`` transaction that reads the head and writes the next
event, so any number of processes and threads appending to the same file keep one chain. Every
``checkpoint_every`` events the owner's Ed25519 key signs the head (a checkpoint), which is what
stops someone with write access from rewriting the chain and recomputing every hash after it.

Triggers refuse UPDATE and DELETE so that no aipipe code path can alter history by mistake; they
are no defence against someone who can drop them, which is what `aipipe.audit.verify` is for.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from aipipe.audit.events import (
    CHECKPOINT_FIELDS,
    EVENT_FIELDS,
    GENESIS_HASH,
    Action,
    AuditEvent,
    Checkpoint,
    Outcome,
    canonical_json,
    check_action,
    check_outcome,
    checkpoint_message,
    content_hash,
    normalise_details,
    record_from_row,
)
from aipipe.clock import utc_now
from aipipe.errors import ConfigError, IdentityError, StoreError
from aipipe.secure.identity import Identity
from aipipe.store.sqlite import private_db

SCHEMA_VERSION = 1
_BUSY_TIMEOUT_S = 30.0
_log = logging.getLogger(__name__)

_SCHEMA = (
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


def _connect(path: Path) -> sqlite3.Connection:
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
def _transaction(conn: sqlite3.Connection, path: Path, mode: str) -> Iterator[sqlite3.Connection]:
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


def _check_schema(conn: sqlite3.Connection, path: Path) -> str | None:
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
    conn = _connect(path)
    try:
        with _transaction(conn, path, "DEFERRED"):
            try:
                owner = _check_schema(conn, path)
                columns = ", ".join(CHECKPOINT_FIELDS)
                rows = conn.execute(f"SELECT {columns} FROM checkpoints ORDER BY seq").fetchall()
            except sqlite3.Error as exc:
                raise StoreError(f"{path} is not an aipipe audit log: {exc}") from exc
            checkpoints = [Checkpoint.from_dict(dict(row)) for row in rows]
            yield LogSnapshot(path, owner, checkpoints, conn)
    finally:
        conn.close()


class AuditLog:
    """Append-only, hash-chained audit events of one process, with signed checkpoints.

    Use `AuditLog.open`; one instance may be shared by threads (appends are serialised).
    """

    def __init__(
        self,
        conn: sqlite3.Connection,
        path: Path,
        identity: Identity | None,
        checkpoint_every: int,
        owner: str | None,
    ) -> None:
        self._conn = conn
        self._path = path
        self._identity = identity
        self._checkpoint_every = checkpoint_every
        self._owner = owner
        self._lock = threading.Lock()
        self._latest: Checkpoint | None = None

    @classmethod
    def open(
        cls,
        path: Path,
        identity: Identity | None,
        checkpoint_every: int = 100,
        *,
        owner: str | None = None,
    ) -> AuditLog:
        """Open or create the log at `path`.

        `identity` signs a checkpoint every `checkpoint_every` events and at `close`; opening
        with it records that cadence in the log as a signed ``audit.policy`` event (when the log
        has none yet, or another cadence or key), which `verify` then holds the log to. With
        ``None`` the log appends unsigned (verify refuses such a log unless told to accept it).
        `owner`, a node or hub name, is kept in the log (the latest given wins) and names the
        FHIR export's observer.
        """
        if checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be at least 1, not {checkpoint_every}")
        conn = _connect(path)
        try:
            with _transaction(conn, path, "IMMEDIATE"):
                for statement in _SCHEMA:
                    conn.execute(statement)
                recorded = _check_schema(conn, path)
                conn.execute(
                    "INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,)
                )
                if owner is not None and owner != recorded:
                    conn.execute("INSERT OR REPLACE INTO meta VALUES ('owner', ?)", (owner,))
                    recorded = owner
                if identity is not None:
                    _record_policy(conn, identity, checkpoint_every)
                latest = _latest_checkpoint(conn, identity)
        except BaseException:
            conn.close()
            raise
        log = cls(conn, path, identity, checkpoint_every, recorded)
        log._latest = latest
        return log

    @property
    def path(self) -> Path:
        return self._path

    @property
    def owner(self) -> str | None:
        return self._owner

    def append(
        self,
        action: Action | str,
        *,
        actor: str,
        resource: str = "",
        outcome: Outcome | str = Outcome.SUCCESS,
        details: Mapping[str, Any] | None = None,
    ) -> AuditEvent:
        """Add one event at the head of the chain and return it as stored.

        `actor` and `resource` are pseudonymous ids (``node:st-olav``, ``study:chd``,
        ``patient:<pseudonym>``); `details` holds counts, ε, norms and such, never PHI.
        Raises `ValueError` or `TypeError` for a malformed event (a bug in the caller).
        """
        name = check_action(action)
        result = check_outcome(outcome)
        if not actor:
            raise ValueError("audit actor must be a pseudonymous id such as 'node:st-olav'")
        body = normalise_details(details)
        with self._lock, _transaction(self._conn, self._path, "IMMEDIATE") as conn:
            event = _insert_event(conn, name, actor, resource, result, body)
            # The cadence the log promises (its latest policy), not this opener's: another
            # process may have recorded a different one since.
            every = _policy_cadence(conn) or self._checkpoint_every
            if self._identity is not None and event.seq % every == 0:
                self._latest = _sign(conn, self._identity, event.seq, event.hash)
        return event

    def checkpoint(self) -> Checkpoint | None:
        """Sign the current head now (at shutdown, say); ``None`` when the log is empty."""
        if self._identity is None:
            raise IdentityError(
                f"audit log {self._path} was opened without an identity key, so it cannot sign "
                "a checkpoint; open it with the owner's Identity"
            )
        with self._lock, _transaction(self._conn, self._path, "IMMEDIATE") as conn:
            head = conn.execute("SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1").fetchone()
            if head is None:
                return None
            self._latest = _sign(conn, self._identity, head[0], head[1])
            return self._latest

    @property
    def latest_checkpoint(self) -> Checkpoint | None:
        """The newest checkpoint this instance signed or found signed by its key at open.

        Cached, so that handing the signed head out (the hub's response header) costs nothing.
        """
        return self._latest

    def head(self) -> AuditEvent | None:
        """The last event, or ``None`` for an empty log."""
        with self._lock:
            row = self._conn.execute(
                f"SELECT {', '.join(EVENT_FIELDS)} FROM events ORDER BY seq DESC LIMIT 1"
            ).fetchone()
        return None if row is None else _event_from_row(dict(row))

    def events(self, start: int = 1) -> Iterator[AuditEvent]:
        """Stored events from seq `start` on, in order (read as stored; verify judges them)."""
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {', '.join(EVENT_FIELDS)} FROM events WHERE seq >= ? ORDER BY seq",
                (start,),
            ).fetchall()
        for row in rows:
            yield _event_from_row(dict(row))

    def checkpoints(self) -> list[Checkpoint]:
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {', '.join(CHECKPOINT_FIELDS)} FROM checkpoints ORDER BY seq"
            ).fetchall()
        return [Checkpoint.from_dict(dict(row)) for row in rows]

    def close(self) -> None:
        """Sign the head if events came after the last checkpoint (shutdown), then close."""
        try:
            if self._identity is not None:
                self.checkpoint()
        except StoreError as exc:  # a full disk must not stop the shutdown; verify will tell
            _log.warning("could not sign the audit head at close: %s", exc)
        finally:
            self._conn.close()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _sign(conn: sqlite3.Connection, identity: Identity, seq: int, head: str) -> Checkpoint:
    existing = conn.execute(
        f"SELECT {', '.join(CHECKPOINT_FIELDS)} FROM checkpoints WHERE seq = ?", (seq,)
    ).fetchone()
    if existing is not None:
        return Checkpoint.from_dict(dict(existing))
    checkpoint = Checkpoint(
        seq=seq,
        hash=head,
        time=utc_now(),
        public_key=identity.public_hex,
        signature=identity.sign(checkpoint_message(seq, head)).hex(),
    )
    record = checkpoint.to_dict()
    conn.execute(
        f"INSERT INTO checkpoints ({', '.join(CHECKPOINT_FIELDS)}) VALUES (?, ?, ?, ?, ?)",
        [record[key] for key in CHECKPOINT_FIELDS],
    )
    return checkpoint


def _insert_event(
    conn: sqlite3.Connection,
    action: str,
    actor: str,
    resource: str,
    outcome: str,
    details: dict[str, Any],
) -> AuditEvent:
    """Append one event at the head inside the caller's write transaction."""
    head = conn.execute("SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1").fetchone()
    seq, prev_hash = (1, GENESIS_HASH) if head is None else (head[0] + 1, head[1])
    content: dict[str, Any] = {
        "seq": seq,
        "time": utc_now(),
        "actor": actor,
        "action": action,
        "resource": resource,
        "outcome": outcome,
        "details": details,
        "prev_hash": prev_hash,
    }
    event = AuditEvent(**content, hash=content_hash(content))
    row = {**content, "details": canonical_json(details), "hash": event.hash}
    conn.execute(
        f"INSERT INTO events ({', '.join(EVENT_FIELDS)}) "
        f"VALUES ({', '.join('?' * len(EVENT_FIELDS))})",
        [row[key] for key in EVENT_FIELDS],
    )
    return event


def _policy_cadence(conn: sqlite3.Connection) -> int | None:
    row = conn.execute("SELECT value FROM meta WHERE key = 'checkpoint_every'").fetchone()
    try:
        return None if row is None else max(int(row[0]), 1)
    except ValueError:
        return None


def _record_policy(conn: sqlite3.Connection, identity: Identity, every: int) -> None:
    """Promise a checkpoint every `every` events, as a signed event, unless already promised.

    The promise is an event (hashed, chained, and signed by a checkpoint at its own seq), so
    deleting checkpoint rows, all events, or the promise itself fails `verify`; ``meta`` only
    caches it for writers.
    """
    promised = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    if (
        promised.get("checkpoint_every") == str(every)
        and promised.get("policy_key") == identity.public_hex
    ):
        return
    details = {"checkpoint_every": every, "public_key": identity.public_hex}
    event = _insert_event(conn, Action.AUDIT_POLICY.value, "audit", "audit-log", "success", details)
    _sign(conn, identity, event.seq, event.hash)
    conn.execute("INSERT OR REPLACE INTO meta VALUES ('checkpoint_every', ?)", (str(every),))
    conn.execute("INSERT OR REPLACE INTO meta VALUES ('policy_key', ?)", (identity.public_hex,))


def _latest_checkpoint(conn: sqlite3.Connection, identity: Identity | None) -> Checkpoint | None:
    if identity is None:
        return None
    row = conn.execute(
        f"SELECT {', '.join(CHECKPOINT_FIELDS)} FROM checkpoints WHERE public_key = ? "
        "ORDER BY seq DESC LIMIT 1",
        (identity.public_hex,),
    ).fetchone()
    return None if row is None else Checkpoint.from_dict(dict(row))


def _event_from_row(row: Mapping[str, Any]) -> AuditEvent:
    return AuditEvent.from_dict(record_from_row(row))
