"""The hub store's nodes: one-time enrolment tokens (hashed) and the nodes they enrolled.

`NodeTables` is the part of `HubStore` over the ``enrol_tokens`` and ``nodes`` tables: issuing
a token, redeeming it (atomically: a token enrols once), and looking a node up by name or by its
credential. Secrets and credentials are kept as sha256 hashes only.
"""

from __future__ import annotations

import hashlib
import sqlite3
from dataclasses import dataclass

from aipipe.clock import plus, utc_now
from aipipe.store.node_store import later
from aipipe.store.sqlite import Tables

# A token recorded before tokens carried an expiry lives this long after it was issued.
DEFAULT_TOKEN_TTL_S = 24 * 3600.0


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class Enrolment:
    """What redeeming a token did: `status` is enrolled, re-enrolled, invalid, expired or
    taken (a plain token for a name already enrolled); `previous_key` the key it replaced."""

    status: str
    expires_at: str | None = None
    previous_key: str | None = None


class NodeTables(Tables):
    """Enrolment tokens and enrolled nodes (part of `HubStore`)."""

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
