"""The site ledger's tables, and the migration of a per-study ledger written before issue 10.

Old rows were keyed (study, round) and were all training updates; they become releases of kind
"train" with no digest (their bytes were never recorded, so a re-offer of such a round is
refused) and keep charging the site: the migration only adds columns and widens the key.
"""

from __future__ import annotations

import sqlite3

from sqlite_utils import Database

LEDGER = "privacy_ledger"
BUDGET = "privacy_budget"
SITE = "privacy_site"
FRAMES = "privacy_frames"
COHORTS = "privacy_cohorts"  # (study, keyed hash of a pseudonymous patient id): never raw ids
GROUPS = "privacy_groups"  # each study's cohort claim and how it is accounted (cohorts.py)

_LEDGER_COLUMNS = (
    "study TEXT NOT NULL, kind TEXT NOT NULL DEFAULT 'train', round INTEGER NOT NULL, "
    "epsilon FLOAT, delta FLOAT, noise_multiplier FLOAT, sample_rate FLOAT, steps INTEGER, "
    "accountant TEXT, time TEXT, digest TEXT, site_epsilon FLOAT, "
    "PRIMARY KEY (study, kind, round)"
)
_OLD_COLUMNS = (
    "study, round, epsilon, delta, noise_multiplier, sample_rate, steps, accountant, time"
)


def ensure_schema(db: Database) -> None:
    """Create the ledger's tables, or migrate an old ledger in place (one transaction)."""
    conn = db.conn
    if _ready(conn):
        return
    joined = conn.in_transaction
    if not joined:
        conn.execute("BEGIN IMMEDIATE")
    try:
        _create(conn)
    except BaseException:
        if not joined:
            conn.rollback()
        raise
    if not joined:
        conn.commit()


def _ready(conn: sqlite3.Connection) -> bool:
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if not {LEDGER, BUDGET, SITE, FRAMES, COHORTS, GROUPS} <= tables:
        return False
    return "kind" in _columns(conn, LEDGER)


def _create(conn: sqlite3.Connection) -> None:
    conn.execute(
        f"CREATE TABLE IF NOT EXISTS [{BUDGET}] (study TEXT PRIMARY KEY, "
        "epsilon_budget FLOAT NOT NULL, delta FLOAT NOT NULL)"
    )
    conn.execute(
        f"CREATE TABLE IF NOT EXISTS [{SITE}] (id INTEGER PRIMARY KEY, "
        "epsilon_budget FLOAT NOT NULL, delta FLOAT NOT NULL)"
    )
    conn.execute(
        f"CREATE TABLE IF NOT EXISTS [{FRAMES}] (study TEXT NOT NULL, kind TEXT NOT NULL, "
        "round INTEGER NOT NULL, frame BLOB NOT NULL, PRIMARY KEY (study, kind, round))"
    )
    conn.execute(
        f"CREATE TABLE IF NOT EXISTS [{COHORTS}] (study TEXT NOT NULL, "
        "patient_hash TEXT NOT NULL, PRIMARY KEY (study, patient_hash))"
    )
    conn.execute(
        f"CREATE TABLE IF NOT EXISTS [{GROUPS}] (study TEXT PRIMARY KEY, claim TEXT NOT NULL, "
        "grp TEXT NOT NULL, since TEXT NOT NULL, reason TEXT NOT NULL, known INTEGER NOT NULL)"
    )
    columns = _columns(conn, LEDGER)
    if not columns:
        conn.execute(f"CREATE TABLE [{LEDGER}] ({_LEDGER_COLUMNS})")
    elif "kind" not in columns:
        conn.execute(f"CREATE TABLE [{LEDGER}_v2] ({_LEDGER_COLUMNS})")
        conn.execute(
            f"INSERT INTO [{LEDGER}_v2] ({_OLD_COLUMNS}, kind) "
            f"SELECT {_OLD_COLUMNS}, 'train' FROM [{LEDGER}]"
        )
        conn.execute(f"DROP TABLE [{LEDGER}]")
        conn.execute(f"ALTER TABLE [{LEDGER}_v2] RENAME TO [{LEDGER}]")


def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {str(r[1]) for r in conn.execute(f"PRAGMA table_info([{table}])")}
