"""`HubStore`: the hub's state in SQLite — nodes, studies, rounds, models, metrics.

All round state lives here, never in process memory, so a hub killed mid-round resumes from
the store and a second replica over a shared database would see the same rounds. The running
sum of a round's accepted updates is stored with the round and folded inside the same
transaction that records the update, so an accepted update is never lost nor counted twice.
Model weights rest in a content-addressed blob directory (sha256 of the safetensors bytes).
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aipipe.clock import plus, utc_now
from aipipe.errors import BlobIntegrityError, StoreError
from aipipe.store.node_store import later
from aipipe.store.sqlite import immediate, private_db

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS enrol_tokens (
    node TEXT PRIMARY KEY, secret_hash TEXT NOT NULL, created_at TEXT NOT NULL, used_at TEXT,
    expires_at TEXT, replaces INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS nodes (
    name TEXT PRIMARY KEY, public_key TEXT NOT NULL, credential_hash TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL, enrolled_at TEXT NOT NULL, last_seen TEXT);
CREATE TABLE IF NOT EXISTS studies (
    name TEXT PRIMARY KEY, digest TEXT NOT NULL, spec TEXT NOT NULL, published_at TEXT NOT NULL,
    current_version TEXT, optimizer_state BLOB);
CREATE TABLE IF NOT EXISTS rounds (
    study TEXT NOT NULL, round INTEGER NOT NULL, state TEXT NOT NULL, base_version TEXT NOT NULL,
    deadline TEXT NOT NULL, opened_at TEXT NOT NULL, closed_at TEXT, reason TEXT,
    result_version TEXT, sum_blob BLOB, total_examples INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (study, round));
CREATE TABLE IF NOT EXISTS round_nodes (
    study TEXT NOT NULL, round INTEGER NOT NULL, node TEXT NOT NULL, status TEXT NOT NULL,
    reason TEXT, num_examples INTEGER, epsilon REAL, update_norm REAL, train_loss REAL,
    payload_sha256 TEXT, signature TEXT, at TEXT, PRIMARY KEY (study, round, node));
CREATE TABLE IF NOT EXISTS nonces (node TEXT NOT NULL, nonce TEXT NOT NULL,
    PRIMARY KEY (node, nonce));
CREATE TABLE IF NOT EXISTS exclusions (study TEXT NOT NULL, node TEXT NOT NULL,
    reason TEXT NOT NULL, PRIMARY KEY (study, node));
CREATE TABLE IF NOT EXISTS models (
    version TEXT PRIMARY KEY, study TEXT NOT NULL, round INTEGER NOT NULL, parent TEXT,
    created_at TEXT NOT NULL, aggregator TEXT NOT NULL, blob TEXT NOT NULL,
    lineage TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS feature_stats (
    study TEXT NOT NULL, node TEXT NOT NULL, digest TEXT NOT NULL, stats TEXT NOT NULL,
    PRIMARY KEY (study, node));
CREATE TABLE IF NOT EXISTS metrics (
    version TEXT NOT NULL, node TEXT NOT NULL, report TEXT NOT NULL, at TEXT NOT NULL,
    PRIMARY KEY (version, node));
"""

ACTIVE = ("open", "collecting")
# A token recorded before tokens carried an expiry lives this long after it was issued.
DEFAULT_TOKEN_TTL_S = 24 * 3600.0
_TOKEN_COLUMNS = {"expires_at": "TEXT", "replaces": "INTEGER NOT NULL DEFAULT 0"}


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class Enrolment:
    """What redeeming a token did: `status` is enrolled, re-enrolled, invalid, expired or
    taken (a plain token for a name already enrolled); `previous_key` the key it replaced."""

    status: str
    expires_at: str | None = None
    previous_key: str | None = None


@dataclass(frozen=True)
class RoundRow:
    study: str
    round: int
    state: str
    base_version: str
    deadline: str
    reason: str | None
    result_version: str | None
    sum_blob: bytes | None
    total_examples: int


def _add_token_columns(conn: sqlite3.Connection) -> None:
    """Hub stores made before tokens expired lack these columns."""
    have = {row[1] for row in conn.execute("PRAGMA table_info(enrol_tokens)")}
    for column, kind in _TOKEN_COLUMNS.items():
        if column not in have:
            conn.execute(f"ALTER TABLE enrol_tokens ADD COLUMN {column} {kind}")


class HubStore:
    def __init__(self, conn: sqlite3.Connection, blob_dir: Path) -> None:
        self.conn = conn
        self.blob_dir = blob_dir

    @classmethod
    def open(cls, path: Path, blob_dir: Path) -> HubStore:
        try:
            private_db(path)
            conn = sqlite3.connect(path, isolation_level=None, timeout=30, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.executescript(_SCHEMA)
            _add_token_columns(conn)
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"cannot open hub store {path}: {exc}") from exc
        blob_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        return cls(conn, blob_dir)

    def close(self) -> None:
        self.conn.close()

    def transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        return immediate(self.conn)

    # -- meta and tokens ----------------------------------------------------------------------

    def set_meta(self, key: str, value: str) -> None:
        self.conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def meta(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def add_enrol_token(
        self, node: str, secret: str, *, expires_at: str | None = None, replaces: bool = False
    ) -> None:
        """Record a token (hashed); `replaces` lets it re-enrol a node that is enrolled."""
        self.conn.execute(
            "INSERT OR REPLACE INTO enrol_tokens "
            "(node, secret_hash, created_at, used_at, expires_at, replaces) "
            "VALUES (?, ?, ?, NULL, ?, ?)",
            (node, secret_hash(secret), utc_now(), expires_at, int(replaces)),
        )

    def enrol(self, node: str, secret: str, public_key: str, credential: str) -> Enrolment:
        """Consume a one-time token and register the node, unless the token is unknown, used,
        expired, or a plain token for a name that is already enrolled (nothing changes then)."""
        with self.transaction() as conn:
            row = conn.execute("SELECT * FROM enrol_tokens WHERE node = ?", (node,)).fetchone()
            if (
                row is None
                or row["used_at"] is not None
                or row["secret_hash"] != secret_hash(secret)
            ):
                return Enrolment("invalid")
            expires = row["expires_at"] or plus(row["created_at"], DEFAULT_TOKEN_TTL_S)
            now = utc_now()
            if not later(expires, now):
                return Enrolment("expired", expires)
            known = conn.execute("SELECT public_key FROM nodes WHERE name = ?", (node,)).fetchone()
            if known is not None and not row["replaces"]:
                return Enrolment("taken", expires)
            conn.execute("UPDATE enrol_tokens SET used_at = ? WHERE node = ?", (now, node))
            conn.execute(
                "INSERT OR REPLACE INTO nodes VALUES (?, ?, ?, 'active', ?, NULL)",
                (node, public_key, secret_hash(credential), now),
            )
        if known is None:
            return Enrolment("enrolled", expires)
        return Enrolment("re-enrolled", expires, str(known["public_key"]))

    def is_enrolled(self, node: str) -> bool:
        return (
            self.conn.execute("SELECT 1 FROM nodes WHERE name = ?", (node,)).fetchone() is not None
        )

    def node_for_credential(self, credential: str) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self.conn.execute(
            "SELECT * FROM nodes WHERE credential_hash = ?", (secret_hash(credential),)
        ).fetchone()
        return row

    def public_key(self, node: str) -> bytes | None:
        """An enrolled node's Ed25519 identity key, or None for a node the hub does not know."""
        row = self.conn.execute("SELECT public_key FROM nodes WHERE name = ?", (node,)).fetchone()
        return None if row is None else bytes.fromhex(row[0])

    def touch_node(self, node: str) -> None:
        self.conn.execute("UPDATE nodes SET last_seen = ? WHERE name = ?", (utc_now(), node))

    def nodes(self) -> list[sqlite3.Row]:
        return list(self.conn.execute("SELECT * FROM nodes ORDER BY name"))

    # -- studies -----------------------------------------------------------------------------

    def add_study(self, name: str, digest: str, spec: dict[str, Any], version: str) -> None:
        self.conn.execute(
            "INSERT INTO studies VALUES (?, ?, ?, ?, ?, NULL)",
            (name, digest, json.dumps(spec), utc_now(), version),
        )

    def study(self, name: str) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self.conn.execute(
            "SELECT * FROM studies WHERE name = ?", (name,)
        ).fetchone()
        return row

    def studies(self) -> list[sqlite3.Row]:
        return list(self.conn.execute("SELECT * FROM studies ORDER BY name"))

    def set_study_head(self, study: str, version: str, optimizer_state: bytes | None) -> None:
        """The study's current model version and the server optimizer's state after it."""
        self.conn.execute(
            "UPDATE studies SET current_version = ?, optimizer_state = ? WHERE name = ?",
            (version, optimizer_state, study),
        )

    def exclude(self, study: str, node: str, reason: str) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO exclusions VALUES (?, ?, ?)", (study, node, reason)
        )

    def excluded(self, study: str, node: str) -> bool:
        row = self.conn.execute(
            "SELECT 1 FROM exclusions WHERE study = ? AND node = ?", (study, node)
        ).fetchone()
        return row is not None

    def takes_part(self, study: str, node: str) -> bool:
        """Selected for (hence offered work in) a round of the study, and not excluded since."""
        row = self.conn.execute(
            "SELECT 1 FROM round_nodes WHERE study = ? AND node = ? LIMIT 1", (study, node)
        ).fetchone()
        return row is not None and not self.excluded(study, node)

    def eligible_nodes(self, study: str) -> list[str]:
        rows = self.conn.execute(
            "SELECT name FROM nodes WHERE state = 'active' AND name NOT IN "
            "(SELECT node FROM exclusions WHERE study = ?) ORDER BY name",
            (study,),
        )
        return [r[0] for r in rows]

    # -- rounds ------------------------------------------------------------------------------

    def _round(self, conn: sqlite3.Connection, study: str, number: int) -> RoundRow | None:
        row = conn.execute(
            "SELECT study, round, state, base_version, deadline, reason, result_version, "
            "sum_blob, total_examples FROM rounds WHERE study = ? AND round = ?",
            (study, number),
        ).fetchone()
        return None if row is None else RoundRow(*row)

    def round(self, study: str, number: int) -> RoundRow | None:
        return self._round(self.conn, study, number)

    def rounds(self, study: str) -> list[RoundRow]:
        numbers = self.conn.execute(
            "SELECT round FROM rounds WHERE study = ? ORDER BY round", (study,)
        )
        return [r for (n,) in list(numbers) if (r := self.round(study, n)) is not None]

    def active_round(self, study: str) -> RoundRow | None:
        row = self.conn.execute(
            "SELECT round FROM rounds WHERE study = ? AND state IN ('open','collecting',"
            "'aggregating') ORDER BY round DESC LIMIT 1",
            (study,),
        ).fetchone()
        return None if row is None else self.round(study, int(row[0]))

    def open_round(self, study: str, base_version: str, deadline: str, selected: list[str]) -> int:
        with self.transaction() as conn:
            row = conn.execute(
                "SELECT coalesce(max(round), 0) FROM rounds WHERE study = ?", (study,)
            ).fetchone()
            number = int(row[0]) + 1
            conn.execute(
                "INSERT INTO rounds (study, round, state, base_version, deadline, opened_at) "
                "VALUES (?, ?, 'open', ?, ?, ?)",
                (study, number, base_version, deadline, utc_now()),
            )
            conn.executemany(
                "INSERT INTO round_nodes (study, round, node, status) VALUES (?, ?, ?, 'selected')",
                [(study, number, node) for node in selected],
            )
        return number

    def round_nodes(self, study: str, number: int) -> list[sqlite3.Row]:
        return list(
            self.conn.execute(
                "SELECT * FROM round_nodes WHERE study = ? AND round = ? ORDER BY node",
                (study, number),
            )
        )

    def pending_rounds(self) -> list[RoundRow]:
        rows = self.conn.execute(
            "SELECT study, round FROM rounds WHERE state IN ('open','collecting','aggregating')"
        )
        return [r for s, n in list(rows) if (r := self.round(s, n)) is not None]

    def set_round_state(
        self,
        study: str,
        number: int,
        state: str,
        reason: str | None = None,
        result_version: str | None = None,
    ) -> None:
        closed = utc_now() if state in ("closed", "failed") else None
        self.conn.execute(
            "UPDATE rounds SET state = ?, reason = coalesce(?, reason), "
            "result_version = coalesce(?, result_version), closed_at = coalesce(?, closed_at) "
            "WHERE study = ? AND round = ?",
            (state, reason, result_version, closed, study, number),
        )

    def fold_update(
        self,
        study: str,
        number: int,
        node: str,
        record: dict[str, Any],
        fold: Callable[[bytes | None], bytes | None],
    ) -> str | None:
        """Record an accepted update and fold it into the round's sum, atomically.

        `fold` maps the stored sum to the new one; under SecAgg+ nothing is stored (None): the
        masked sum is the round coordinator's, and only an unmasked sum ever reaches the store.

        Returns None on success, or why the update cannot be taken (checked inside the
        transaction, so two concurrent uploads cannot both pass).
        """
        with self.transaction() as conn:
            current = self._round(conn, study, number)
            if current is None or current.state not in ACTIVE:
                return f"round {number} of '{study}' is not collecting updates"
            if later(utc_now(), current.deadline):
                return f"round {number} of '{study}' passed its deadline {current.deadline}"
            status = conn.execute(
                "SELECT status FROM round_nodes WHERE study = ? AND round = ? AND node = ?",
                (study, number, node),
            ).fetchone()
            if status is None:
                return f"node '{node}' was not selected for round {number}"
            if status[0] != "selected":
                return f"node '{node}' already {status[0]} in round {number} (duplicate)"
            if conn.execute(
                "SELECT 1 FROM nonces WHERE node = ? AND nonce = ?", (node, record["nonce"])
            ).fetchone():
                return "this update was already received once (replayed nonce)"
            new_sum = fold(current.sum_blob)
            conn.execute(
                "UPDATE rounds SET sum_blob = ?, total_examples = total_examples + coalesce(?, 0), "
                "state = 'collecting' WHERE study = ? AND round = ?",
                (new_sum, record["num_examples"], study, number),
            )
            conn.execute(
                "UPDATE round_nodes SET status = 'reported', num_examples = ?, epsilon = ?, "
                "update_norm = ?, train_loss = ?, payload_sha256 = ?, signature = ?, at = ? "
                "WHERE study = ? AND round = ? AND node = ?",
                (
                    record["num_examples"],
                    record["epsilon"],
                    record["update_norm"],
                    record["train_loss"],
                    record["payload_sha256"],
                    record["signature"],
                    utc_now(),
                    study,
                    number,
                    node,
                ),
            )
            conn.execute("INSERT INTO nonces VALUES (?, ?)", (node, record["nonce"]))
        return None

    def node_status(self, study: str, number: int, node: str) -> str | None:
        row = self.conn.execute(
            "SELECT status FROM round_nodes WHERE study = ? AND round = ? AND node = ?",
            (study, number, node),
        ).fetchone()
        return None if row is None else str(row[0])

    def record_decline(self, study: str, number: int, node: str, reason: str) -> bool:
        """Mark a pending node as declined in an active round; False if nothing was pending."""
        cursor = self.conn.execute(
            "UPDATE round_nodes SET status = 'declined', reason = ?, at = ? "
            "WHERE study = ? AND round = ? AND node = ? AND status = 'selected' AND EXISTS "
            "(SELECT 1 FROM rounds r WHERE r.study = round_nodes.study AND "
            "r.round = round_nodes.round AND r.state IN ('open', 'collecting'))",
            (reason, utc_now(), study, number, node),
        )
        return cursor.rowcount == 1

    # -- blobs and models --------------------------------------------------------------------

    def put_blob(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        path = self.blob_dir / digest[:2] / digest
        if not path.exists():
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        return digest

    def blob(self, digest: str) -> bytes:
        """The bytes stored at `digest`, checked against it: a damaged file is never served.

        The error names the digest, not the path: it can reach an HTTP caller.
        """
        path = self.blob_dir / digest[:2] / digest
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise BlobIntegrityError(
                f"model blob {digest[:12]} is missing from the hub's blob store; restore the "
                "hub home's blobs/ from a backup"
            ) from exc
        if hashlib.sha256(data).hexdigest() != digest:
            raise BlobIntegrityError(
                f"model blob {digest[:12]} is damaged (its sha256 does not match); restore the "
                "hub home's blobs/ from a backup"
            )
        return data

    def add_model(
        self,
        version: str,
        study: str,
        number: int,
        parent: str | None,
        aggregator: str,
        blob: str,
        lineage: dict[str, Any],
    ) -> None:
        self.conn.execute(
            "INSERT OR IGNORE INTO models VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (version, study, number, parent, utc_now(), aggregator, blob, json.dumps(lineage)),
        )

    def model(self, version: str) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self.conn.execute(
            "SELECT * FROM models WHERE version = ?", (version,)
        ).fetchone()
        return row

    def models(self, study: str | None = None) -> list[sqlite3.Row]:
        if study is None:
            return list(self.conn.execute("SELECT * FROM models ORDER BY created_at"))
        return list(
            self.conn.execute("SELECT * FROM models WHERE study = ? ORDER BY round", (study,))
        )

    def add_metrics(self, version: str, node: str, report: dict[str, Any]) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO metrics VALUES (?, ?, ?, ?)",
            (version, node, json.dumps(report), utc_now()),
        )

    def metrics(self, version: str) -> dict[str, dict[str, Any]]:
        rows = self.conn.execute(
            "SELECT node, report FROM metrics WHERE version = ? ORDER BY node", (version,)
        )
        return {node: json.loads(report) for node, report in rows}

    def put_feature_stats(self, study: str, node: str, digest: str, stats: dict[str, Any]) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO feature_stats VALUES (?, ?, ?, ?)",
            (study, node, digest, json.dumps(stats)),
        )

    def feature_stats(self, study: str, digest: str) -> list[dict[str, Any]]:
        rows = self.conn.execute(
            "SELECT stats FROM feature_stats WHERE study = ? AND digest = ? ORDER BY node",
            (study, digest),
        )
        return [json.loads(row[0]) for row in rows]

    def has_metrics(self, version: str, node: str) -> bool:
        row = self.conn.execute(
            "SELECT 1 FROM metrics WHERE version = ? AND node = ?", (version, node)
        ).fetchone()
        return row is not None
