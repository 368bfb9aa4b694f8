"""`HubStore`: the hub's state in SQLite — nodes, studies, rounds, models, metrics.

All round state lives here, never in process memory, so a hub killed mid-round resumes from
the store and a second replica over a shared database would see the same rounds. This module
holds the schema of every table, opening the store, and its ``meta`` key-value table; the
tables' operations live in three parts that `HubStore` is made of: `NodeTables`
(``hub_nodes.py``: enrolment tokens and nodes), `RoundTables` (``hub_rounds.py``: studies,
rounds and the updates they accepted) and `ModelTables` (``hub_models.py``: model blobs and
versions, metrics, feature statistics); `ReputationTables` (``hub_reputation.py``) adds the
screening of plaintext rounds: each update's scores and each node's reputation;
`PeopleTables` (``hub_people.py``) people and their role-scoped API tokens.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from aipipe.errors import StoreError
from aipipe.secure.at_rest import PLAIN, AtRest
from aipipe.store.hub_models import ModelTables
from aipipe.store.hub_nodes import NodeTables
from aipipe.store.hub_people import SCHEMA as PEOPLE_SCHEMA
from aipipe.store.hub_people import PeopleTables, migrate_bootstrap
from aipipe.store.hub_reputation import SCHEMA as REPUTATION_SCHEMA
from aipipe.store.hub_reputation import ReputationTables
from aipipe.store.hub_rounds import RoundTables
from aipipe.store.sqlite import private_db

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
-- a site's latest round in a study, looked up at every /metrics scrape (aipipe.hub.metrics)
CREATE INDEX IF NOT EXISTS round_nodes_by_site ON round_nodes (study, node, round);
"""

# The columns a home encrypted at rest seals (`aipipe.secure.rekey` rotates them): a round's
# running sum of updates and a study's server optimizer state (aipipe.store.hub_rounds).
SEALED_COLUMNS = (
    ("rounds", "sum_blob"),
    ("studies", "optimizer_state"),
    ("people", "totp_secret"),
)

_TOKEN_COLUMNS = {"expires_at": "TEXT", "replaces": "INTEGER NOT NULL DEFAULT 0"}


def _add_token_columns(conn: sqlite3.Connection) -> None:
    """Hub stores made before tokens expired lack these columns."""
    have = {row[1] for row in conn.execute("PRAGMA table_info(enrol_tokens)")}
    for column, kind in _TOKEN_COLUMNS.items():
        if column not in have:
            conn.execute(f"ALTER TABLE enrol_tokens ADD COLUMN {column} {kind}")


class HubStore(NodeTables, RoundTables, ModelTables, ReputationTables, PeopleTables):
    """The hub's state: one SQLite connection (`open` creates the tables) and the blob directory."""

    def __init__(self, conn: sqlite3.Connection, blob_dir: Path, at_rest: AtRest = PLAIN) -> None:
        super().__init__(conn)
        self.blob_dir = blob_dir
        self.at_rest = at_rest

    @classmethod
    def open(cls, path: Path, blob_dir: Path, *, at_rest: AtRest = PLAIN) -> HubStore:
        try:
            private_db(path)
            conn = sqlite3.connect(path, isolation_level=None, timeout=30, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.executescript(_SCHEMA)
            conn.executescript(REPUTATION_SCHEMA)
            _add_token_columns(conn)
            conn.executescript(PEOPLE_SCHEMA)
            migrate_bootstrap(conn)
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"cannot open hub store {path}: {exc}") from exc
        blob_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        return cls(conn, blob_dir, at_rest)

    def close(self) -> None:
        self.conn.close()

    # -- meta --------------------------------------------------------------------------------

    def set_meta(self, key: str, value: str) -> None:
        self.conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def meta(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])
