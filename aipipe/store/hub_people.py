"""The hub store's people and API tokens (issue 15, DESIGN §6: role-scoped API tokens).

`PeopleTables` is the part of `HubStore` over ``people`` (a person's role, scrypt password
hash, TOTP secret, failed logins, lock and disabled state, and the last TOTP time step accepted,
so a code works once) and ``api_tokens`` (a token's role is its scope; it belongs to a person or
is a service token with a name; kept as its sha256 only, never the token itself; expiry,
revocation and last use). What the rules are (who may hold which role, lockout, lifetimes) is
`aipipe.hub.people`'s; this module reads and writes rows.

`migrate_bootstrap` turns the admin token `hub init` made before tokens had rows (a hash in
``meta``) into an ordinary admin token named ``bootstrap``, so it can be listed and revoked.
"""

from __future__ import annotations

import secrets
import sqlite3

from aipipe.clock import utc_now
from aipipe.secure.at_rest import AtRest
from aipipe.store.sqlite import Tables

SCHEMA = """
CREATE TABLE IF NOT EXISTS people (
    name TEXT PRIMARY KEY, role TEXT NOT NULL, password_hash TEXT NOT NULL,
    totp_secret TEXT NOT NULL, created_at TEXT NOT NULL, disabled_at TEXT, locked_at TEXT,
    failures INTEGER NOT NULL DEFAULT 0, last_totp_step INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS api_tokens (
    id TEXT PRIMARY KEY, person TEXT, name TEXT NOT NULL, role TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE, created_at TEXT NOT NULL, expires_at TEXT,
    revoked_at TEXT, last_used TEXT);
"""

BOOTSTRAP = "bootstrap"
_LEGACY_ADMIN_HASH = "admin_token_hash"  # meta key of hub homes made before api_tokens


def migrate_bootstrap(conn: sqlite3.Connection) -> None:
    """Move a legacy admin token hash from ``meta`` into ``api_tokens`` (once)."""
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (_LEGACY_ADMIN_HASH,)).fetchone()
    if row is None:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(
            "INSERT OR IGNORE INTO api_tokens (id, person, name, role, token_hash, created_at) "
            "VALUES (?, NULL, ?, 'admin', ?, ?)",
            (new_token_id(), BOOTSTRAP, row[0], utc_now()),
        )
        conn.execute("DELETE FROM meta WHERE key = ?", (_LEGACY_ADMIN_HASH,))
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def new_token_id() -> str:
    """A token's public id (listed, used to revoke it): not a secret."""
    return "tok_" + secrets.token_hex(6)


class PeopleTables(Tables):
    """People and their API tokens (part of `HubStore`). A TOTP secret is sealed under the
    home's at-rest key (`HubStore.at_rest`); a token is kept as its sha256 only."""

    at_rest: AtRest

    # -- people ------------------------------------------------------------------------------

    def add_person(self, name: str, role: str, password_hash: str, totp_secret: str) -> bool:
        """A new person; False if the name is taken (nothing changes then)."""
        cursor = self.conn.execute(
            "INSERT OR IGNORE INTO people (name, role, password_hash, totp_secret, created_at) "
            "VALUES (?, ?, ?, ?, ?)",
            (name, role, password_hash, self.at_rest.seal_text(totp_secret, _totp_label(name)),
             utc_now()),
        )  # fmt: skip
        return cursor.rowcount == 1

    def totp_secret(self, person: sqlite3.Row) -> str:
        """The person's TOTP secret, opened."""
        name = str(person["name"])
        where = f"the TOTP secret of person '{name}'"
        return self.at_rest.open_text(person["totp_secret"], _totp_label(name), where=where)

    def person(self, name: str) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self.conn.execute(
            "SELECT * FROM people WHERE name = ?", (name,)
        ).fetchone()
        return row

    def people(self) -> list[sqlite3.Row]:
        return list(self.conn.execute("SELECT * FROM people ORDER BY name"))

    def disable_person(self, name: str) -> bool:
        cursor = self.conn.execute(
            "UPDATE people SET disabled_at = COALESCE(disabled_at, ?) WHERE name = ?",
            (utc_now(), name),
        )
        return cursor.rowcount == 1

    def unlock_person(self, name: str) -> bool:
        cursor = self.conn.execute(
            "UPDATE people SET locked_at = NULL, failures = 0 WHERE name = ?", (name,)
        )
        return cursor.rowcount == 1

    def login_failed(self, name: str, lock_after: int) -> bool:
        """Count a failed login; lock the person at `lock_after` in a row. True if this locked."""
        with self.transaction() as conn:
            conn.execute("UPDATE people SET failures = failures + 1 WHERE name = ?", (name,))
            cursor = conn.execute(
                "UPDATE people SET locked_at = ? "
                "WHERE name = ? AND locked_at IS NULL AND failures >= ?",
                (utc_now(), name, lock_after),
            )
        return cursor.rowcount == 1

    def login_succeeded(self, name: str, totp_step: int) -> bool:
        """Reset the failure count and spend the TOTP time step, unless a step this late was
        already spent (a replayed code): False then, and nothing changes."""
        cursor = self.conn.execute(
            "UPDATE people SET failures = 0, last_totp_step = ? "
            "WHERE name = ? AND last_totp_step < ?",
            (totp_step, name, totp_step),
        )
        return cursor.rowcount == 1

    # -- tokens ------------------------------------------------------------------------------

    def add_api_token(
        self,
        token_hash: str,
        *,
        role: str,
        name: str,
        person: str | None = None,
        expires_at: str | None = None,
    ) -> str:
        """Record a token by its hash; returns its id."""
        token_id = new_token_id()
        self.conn.execute(
            "INSERT INTO api_tokens (id, person, name, role, token_hash, created_at, expires_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (token_id, person, name, role, token_hash, utc_now(), expires_at),
        )
        return token_id

    def api_token(self, token_hash: str) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self.conn.execute(
            "SELECT * FROM api_tokens WHERE token_hash = ?", (token_hash,)
        ).fetchone()
        return row

    def api_tokens(self) -> list[sqlite3.Row]:
        return list(self.conn.execute("SELECT * FROM api_tokens ORDER BY created_at, id"))

    def revoke_api_token(self, token_id: str) -> bool:
        cursor = self.conn.execute(
            "UPDATE api_tokens SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ?",
            (utc_now(), token_id),
        )
        return cursor.rowcount == 1

    def touch_api_token(self, token_id: str, now: str, since: str) -> None:
        """Record a use at `now` unless one was recorded after `since` (one write a minute)."""
        self.conn.execute(
            "UPDATE api_tokens SET last_used = ? "
            "WHERE id = ? AND (last_used IS NULL OR last_used < ?)",
            (now, token_id, since),
        )


def _totp_label(name: str) -> str:
    return f"people/{name}/totp_secret"
