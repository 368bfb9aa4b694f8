"""Writing the audit chain inside a caller's write transaction: events linked by hash,
checkpoints (the owner's Ed25519 signature over the head), and the checkpoint policy.

The policy (a checkpoint every so many events, by which key) is itself a chained event signed by
a checkpoint at its own seq, so deleting checkpoint rows, all events, or the promise fails
`verify`; the ``meta`` table only caches it for writers.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from typing import Any

from aipipe.audit.events import (
    CHECKPOINT_FIELDS,
    EVENT_FIELDS,
    GENESIS_HASH,
    Action,
    AuditEvent,
    Checkpoint,
    canonical_json,
    checkpoint_message,
    content_hash,
    record_from_row,
)
from aipipe.clock import utc_now
from aipipe.secure.identity import Identity


def sign(conn: sqlite3.Connection, identity: Identity, seq: int, head: str) -> Checkpoint:
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


def insert_event(
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


def policy_cadence(conn: sqlite3.Connection) -> int | None:
    row = conn.execute("SELECT value FROM meta WHERE key = 'checkpoint_every'").fetchone()
    try:
        return None if row is None else max(int(row[0]), 1)
    except ValueError:
        return None


def record_policy(conn: sqlite3.Connection, identity: Identity, every: int) -> None:
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
    event = insert_event(conn, Action.AUDIT_POLICY.value, "audit", "audit-log", "success", details)
    sign(conn, identity, event.seq, event.hash)
    conn.execute("INSERT OR REPLACE INTO meta VALUES ('checkpoint_every', ?)", (str(every),))
    conn.execute("INSERT OR REPLACE INTO meta VALUES ('policy_key', ?)", (identity.public_hex,))


def latest_checkpoint(conn: sqlite3.Connection, identity: Identity | None) -> Checkpoint | None:
    if identity is None:
        return None
    row = conn.execute(
        f"SELECT {', '.join(CHECKPOINT_FIELDS)} FROM checkpoints WHERE public_key = ? "
        "ORDER BY seq DESC LIMIT 1",
        (identity.public_hex,),
    ).fetchone()
    return None if row is None else Checkpoint.from_dict(dict(row))


def event_from_row(row: Mapping[str, Any]) -> AuditEvent:
    return AuditEvent.from_dict(record_from_row(row))
