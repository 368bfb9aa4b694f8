"""The node store's schema, as numbered migrations.

`PRAGMA user_version` holds the number of migrations applied. A store written by a newer aipipe
(user_version above what this code knows) is refused rather than silently misread.
"""

from __future__ import annotations

import sqlite3

from aipipe.errors import StoreError

MIGRATIONS: tuple[str, ...] = (
    # 1: raw resources plus the normalised tables feature extraction reads.
    """
    -- A rowid table with a unique key, not WITHOUT ROWID: rows are ~1 KB of JSON with random
    -- ids, and clustering them on the key dirtied about a page per insert (bench/ingest.py).
    CREATE TABLE resources (
        type TEXT NOT NULL,
        id TEXT NOT NULL,
        version_id TEXT,
        last_updated TEXT,
        patient_id TEXT,
        hash TEXT NOT NULL,
        json TEXT NOT NULL,
        ingested_at TEXT NOT NULL,
        UNIQUE (type, id)
    );
    CREATE INDEX resources_patient ON resources (patient_id);
    CREATE TABLE patients (
        id TEXT PRIMARY KEY,
        pseudonym TEXT NOT NULL,
        birth_year INTEGER,
        birth_date TEXT,
        sex TEXT,
        deceased INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE observations (
        resource_id TEXT NOT NULL,
        component INTEGER NOT NULL,
        patient_id TEXT NOT NULL,
        code TEXT NOT NULL,
        value REAL,
        value_code TEXT,
        unit TEXT,
        effective TEXT,
        PRIMARY KEY (resource_id, component, code)
    ) WITHOUT ROWID;
    CREATE INDEX observations_code_patient ON observations (code, patient_id, effective);
    CREATE TABLE conditions (
        resource_id TEXT NOT NULL,
        patient_id TEXT NOT NULL,
        code TEXT NOT NULL,
        onset TEXT,
        clinical_status TEXT,
        PRIMARY KEY (resource_id, code)
    ) WITHOUT ROWID;
    CREATE INDEX conditions_code_patient ON conditions (code, patient_id);
    CREATE TABLE medications (
        resource_type TEXT NOT NULL,
        resource_id TEXT NOT NULL,
        patient_id TEXT NOT NULL,
        code TEXT NOT NULL,
        status TEXT,
        authored TEXT,
        PRIMARY KEY (resource_type, resource_id, code)
    ) WITHOUT ROWID;
    CREATE INDEX medications_code_patient ON medications (code, patient_id);
    CREATE TABLE cursors (
        source TEXT NOT NULL,
        resource_type TEXT NOT NULL,
        last_updated TEXT NOT NULL,
        synced_at TEXT NOT NULL,
        PRIMARY KEY (source, resource_type)
    );
    CREATE TABLE ingest_runs (
        id INTEGER PRIMARY KEY,
        source TEXT NOT NULL,
        started_at TEXT NOT NULL,
        finished_at TEXT,
        report TEXT
    );
    """,
    # 2: studies this node approved, pinned by digest.
    """
    CREATE TABLE approvals (
        study TEXT PRIMARY KEY,
        digest TEXT NOT NULL,
        spec TEXT NOT NULL,
        approved_at TEXT NOT NULL
    );
    """,
)


def migrate(conn: sqlite3.Connection) -> int:
    """Apply the migrations this store lacks; return the schema version."""
    current = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if current > len(MIGRATIONS):
        raise StoreError(
            f"store schema version {current} is newer than this aipipe knows "
            f"({len(MIGRATIONS)}); upgrade aipipe"
        )
    for number, script in enumerate(MIGRATIONS[current:], start=current + 1):
        conn.executescript(f"BEGIN; {script}; PRAGMA user_version = {number}; COMMIT;")
    return len(MIGRATIONS)
