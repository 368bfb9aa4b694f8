"""The hub's secure-aggregation state in SQLite, beside `HubStore` on the same connection.

- `sealing_keys`: each node's X25519 sealing key with the identity signature that vouches for it;
- `ckks_keys` / `ckks_sealed`: a study's public CKKS context and the secret context sealed to
  each node (the hub cannot open these boxes);
- `secure_rounds`: the stage of a secure round, when the stage gives up on late nodes, and the
  node whose turn it is (the CKKS key holder asked to decrypt);
- `seen_keys`: every SecAgg+ public key ever advertised, so a reused key is refused;
- `secagg_log`: what a SecAgg+ round's server accepted, in order, to rebuild it after a restart
  (signed public keys, node-to-node encrypted shares, masked inputs, revealed shares);
- `secure_updates`: the signed header of each accepted ciphertext, which the CKKS key holder
  re-checks before it decrypts a sum.

Nothing here can decrypt or unmask a node's update: the hub holds public keys, sealed boxes,
ciphertexts and the stage bookkeeping only.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass

from aipipe.clock import utc_now
from aipipe.store.sqlite import immediate

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sealing_keys (node TEXT PRIMARY KEY, sealing_key BLOB NOT NULL,
    signature BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS ckks_keys (study TEXT PRIMARY KEY, generator TEXT NOT NULL,
    fingerprint BLOB NOT NULL, public_context BLOB NOT NULL, signature BLOB NOT NULL,
    created_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS ckks_sealed (study TEXT NOT NULL, node TEXT NOT NULL,
    sealed TEXT NOT NULL, PRIMARY KEY (study, node));
CREATE TABLE IF NOT EXISTS secure_rounds (study TEXT NOT NULL, round INTEGER NOT NULL,
    stage TEXT NOT NULL, stage_deadline TEXT NOT NULL, holder TEXT, PRIMARY KEY (study, round));
CREATE TABLE IF NOT EXISTS seen_keys (key BLOB PRIMARY KEY, round_id TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS secagg_log (study TEXT NOT NULL, round INTEGER NOT NULL,
    kind TEXT NOT NULL, node TEXT NOT NULL, body BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS secagg_log_round ON secagg_log (study, round);
CREATE TABLE IF NOT EXISTS secure_updates (study TEXT NOT NULL, round INTEGER NOT NULL,
    node TEXT NOT NULL, header TEXT NOT NULL, PRIMARY KEY (study, round, node));
"""


@dataclass(frozen=True)
class CkksKeysRow:
    generator: str
    fingerprint: bytes
    public_context: bytes
    signature: bytes


class SecureStore:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        conn.executescript(_SCHEMA)

    # -- sealing keys ------------------------------------------------------------------------

    def set_sealing_key(self, node: str, key: bytes, signature: bytes) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO sealing_keys VALUES (?, ?, ?)", (node, key, signature)
        )

    def sealing_keys(self) -> dict[str, tuple[bytes, bytes]]:
        rows = self.conn.execute("SELECT node, sealing_key, signature FROM sealing_keys")
        return {str(n): (bytes(k), bytes(s)) for n, k, s in rows}

    # -- CKKS key ceremony -------------------------------------------------------------------

    def set_ckks_keys(self, study: str, keys: CkksKeysRow, sealed: dict[str, str]) -> None:
        """The public context and every sealed box, stored together or not at all."""
        with immediate(self.conn) as conn:
            conn.execute(
                "INSERT INTO ckks_keys VALUES (?, ?, ?, ?, ?, ?)",
                (
                    study,
                    keys.generator,
                    keys.fingerprint,
                    keys.public_context,
                    keys.signature,
                    utc_now(),
                ),
            )
            conn.executemany(
                "INSERT INTO ckks_sealed VALUES (?, ?, ?)",
                [(study, node, box) for node, box in sealed.items()],
            )

    def ckks_keys(self, study: str) -> CkksKeysRow | None:
        row = self.conn.execute(
            "SELECT generator, fingerprint, public_context, signature FROM ckks_keys "
            "WHERE study = ?",
            (study,),
        ).fetchone()
        if row is None:
            return None
        return CkksKeysRow(str(row[0]), bytes(row[1]), bytes(row[2]), bytes(row[3]))

    def ckks_sealed(self, study: str, node: str) -> str | None:
        """The node's sealed context as stored (the `SealedContextWire` JSON)."""
        row = self.conn.execute(
            "SELECT sealed FROM ckks_sealed WHERE study = ? AND node = ?", (study, node)
        ).fetchone()
        return None if row is None else str(row[0])

    def ckks_holders(self, study: str) -> set[str]:
        """Nodes holding the study's secret context: the generator and every sealed recipient."""
        keys = self.ckks_keys(study)
        rows = self.conn.execute("SELECT node FROM ckks_sealed WHERE study = ?", (study,))
        return {str(r[0]) for r in rows} | ({keys.generator} if keys else set())

    # -- stages ------------------------------------------------------------------------------

    def set_stage(
        self, study: str, number: int, stage: str, deadline: str, holder: str | None = None
    ) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO secure_rounds VALUES (?, ?, ?, ?, ?)",
            (study, number, stage, deadline, holder),
        )

    def holder(self, study: str, number: int) -> str | None:
        row = self.conn.execute(
            "SELECT holder FROM secure_rounds WHERE study = ? AND round = ?", (study, number)
        ).fetchone()
        return None if row is None or row[0] is None else str(row[0])

    def stage(self, study: str, number: int) -> tuple[str, str] | None:
        """(stage, stage deadline) of a secure round; None for a plaintext round."""
        row = self.conn.execute(
            "SELECT stage, stage_deadline FROM secure_rounds WHERE study = ? AND round = ?",
            (study, number),
        ).fetchone()
        return None if row is None else (str(row[0]), str(row[1]))

    # -- SecAgg+ key freshness ---------------------------------------------------------------

    def add_seen_keys(self, keys: Iterable[bytes], round_id: str) -> None:
        self.conn.executemany(
            "INSERT OR IGNORE INTO seen_keys VALUES (?, ?)", [(k, round_id) for k in keys]
        )

    def seen_keys(self, exclude_round: str | None = None) -> frozenset[bytes]:
        """Keys advertised in earlier rounds (all but `exclude_round`'s, when rebuilding it)."""
        rows = self.conn.execute(
            "SELECT key FROM seen_keys WHERE round_id IS NOT ?", (exclude_round,)
        )
        return frozenset(bytes(r[0]) for r in rows)

    def log_secagg(self, study: str, number: int, kind: str, node: str, body: bytes) -> None:
        self.conn.execute(
            "INSERT INTO secagg_log VALUES (?, ?, ?, ?, ?)", (study, number, kind, node, body)
        )

    def secagg_log(self, study: str, number: int) -> list[tuple[str, str, bytes]]:
        rows = self.conn.execute(
            "SELECT kind, node, body FROM secagg_log WHERE study = ? AND round = ? ORDER BY rowid",
            (study, number),
        )
        return [(str(k), str(n), bytes(b)) for k, n, b in rows]

    def logged_message(self, study: str, number: int, kind: str, node: str) -> bytes | None:
        """What `node` sent as `kind` in this round, if the round's log holds it."""
        row = self.conn.execute(
            "SELECT body FROM secagg_log WHERE study = ? AND round = ? AND kind = ? AND node = ?",
            (study, number, kind, node),
        ).fetchone()
        return None if row is None else bytes(row[0])

    # -- signed headers of secure updates ----------------------------------------------------

    def add_update_header(self, study: str, number: int, node: str, header_json: str) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO secure_updates VALUES (?, ?, ?, ?)",
            (study, number, node, header_json),
        )

    def update_headers(self, study: str, number: int) -> dict[str, str]:
        rows = self.conn.execute(
            "SELECT node, header FROM secure_updates WHERE study = ? AND round = ? ORDER BY node",
            (study, number),
        )
        return {str(n): str(h) for n, h in rows}
