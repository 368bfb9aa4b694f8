"""`AuditLog`: the append-only, hash-chained event table of one node or hub (``audit.sqlite``).

Each append runs in a ``BEGIN IMMEDIATE`` transaction that reads the head and writes the next
event, so any number of processes and threads appending to the same file keep one chain. Every
``checkpoint_every`` events the owner's Ed25519 key signs the head (a checkpoint), which is what
stops someone with write access from rewriting the chain and recomputing every hash after it.

The file (schema, transactions, read snapshots) is `storage.py`'s; writing events and
checkpoints inside a transaction is `chain.py`'s.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from aipipe.audit.chain import (
    event_from_row,
    insert_event,
    latest_checkpoint,
    policy_cadence,
    record_policy,
    sign,
)
from aipipe.audit.events import (
    CHECKPOINT_FIELDS,
    EVENT_FIELDS,
    Action,
    AuditEvent,
    Checkpoint,
    Outcome,
    check_action,
    check_outcome,
    normalise_details,
)
from aipipe.audit.storage import SCHEMA, SCHEMA_VERSION, check_schema, connect, transaction
from aipipe.errors import IdentityError, StoreError
from aipipe.secure.identity import Identity

_log = logging.getLogger(__name__)


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
        conn = connect(path)
        try:
            with transaction(conn, path, "IMMEDIATE"):
                for statement in SCHEMA:
                    conn.execute(statement)
                recorded = check_schema(conn, path)
                conn.execute(
                    "INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,)
                )
                if owner is not None and owner != recorded:
                    conn.execute("INSERT OR REPLACE INTO meta VALUES ('owner', ?)", (owner,))
                    recorded = owner
                if identity is not None:
                    record_policy(conn, identity, checkpoint_every)
                latest = latest_checkpoint(conn, identity)
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
        with self._lock, transaction(self._conn, self._path, "IMMEDIATE") as conn:
            event = insert_event(conn, name, actor, resource, result, body)
            # The cadence the log promises (its latest policy), not this opener's: another
            # process may have recorded a different one since.
            every = policy_cadence(conn) or self._checkpoint_every
            if self._identity is not None and event.seq % every == 0:
                self._latest = sign(conn, self._identity, event.seq, event.hash)
        return event

    def checkpoint(self) -> Checkpoint | None:
        """Sign the current head now (at shutdown, say); ``None`` when the log is empty."""
        if self._identity is None:
            raise IdentityError(
                f"audit log {self._path} was opened without an identity key, so it cannot sign "
                "a checkpoint; open it with the owner's Identity"
            )
        with self._lock, transaction(self._conn, self._path, "IMMEDIATE") as conn:
            head = conn.execute("SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1").fetchone()
            if head is None:
                return None
            self._latest = sign(conn, self._identity, head[0], head[1])
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
        return None if row is None else event_from_row(dict(row))

    def events(self, start: int = 1) -> Iterator[AuditEvent]:
        """Stored events from seq `start` on, in order (read as stored; verify judges them)."""
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {', '.join(EVENT_FIELDS)} FROM events WHERE seq >= ? ORDER BY seq",
                (start,),
            ).fetchall()
        for row in rows:
            yield event_from_row(dict(row))

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
