"""`NodeStore`: the node's local SQLite store of FHIR resources and the rows derived from them.

Writes come in batches inside one transaction, so an interrupted ingest leaves the store as it
was before the batch. A resource is keyed by (type, id); a newer version (later
`meta.lastUpdated`, or a higher numeric `meta.versionId` at the same time) replaces the older
together with all rows derived from it; the same content again is a no-op; an older version is
ignored. Patients get a pseudonym, an HMAC of their id under the node's secret key, which is the
only patient reference that logs and audit events carry.

In a home encrypted at rest the raw resource (`resources.json`) is sealed per row under the
home's key for ``resources/<type>/<id>`` (`aipipe.secure.at_rest`); `resource_json` opens it.
No query reads inside that column: the normalised tables next to it are what SQL filters on.
"""

from __future__ import annotations

import hashlib
import hmac
import sqlite3
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import sqlite_utils

from aipipe.clock import parse_instant, utc_now
from aipipe.errors import StoreError
from aipipe.fhir.mapping import MappedResource
from aipipe.secure.at_rest import PLAIN, AtRest
from aipipe.store.schema import migrate
from aipipe.store.sqlite import immediate, private_db

# The columns a home encrypted at rest seals per row (`aipipe.secure.rekey` rotates them): the
# raw FHIR; the values of the normalised tables that no SQL filters on (the codes, dates and
# ids that the feature queries filter, join and sort on stay in clear); the personal models and
# training states (aipipe.node.personal, personal_state); the weights of the versions it
# evaluated (aipipe.node.kept_versions).
SEALED_COLUMNS = (
    ("resources", "json"),
    ("patients", "birth_year"),
    ("patients", "birth_date"),
    ("patients", "sex"),
    ("observations", "value"),
    ("observations", "value_code"),
    ("observations", "unit"),
    ("conditions", "clinical_status"),
    ("medications", "status"),
    ("medications", "authored"),
    ("personal_models", "weights"),
    ("personal_models", "carry"),
    ("personal_states", "tensors"),
    ("personal_pending", "weights"),
    ("kept_versions", "weights"),
)
# Derives the key of the keyed train/test split from the pseudonym key (domain separation).
_SPLIT_KEY_LABEL = b"aipipe/study-split/v1"
# Derives the key of the cohort hashes the site ledger compares studies with.
_COHORT_KEY_LABEL = b"aipipe/study-cohort/v1"


class WriteOutcome(StrEnum):
    STORED = "stored"
    UPDATED = "updated"
    UNCHANGED = "unchanged"
    STALE = "stale"


def _parse_instant(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        return parse_instant(value)
    except ValueError:
        return None


def later(a: str, b: str) -> bool:
    """Whether instant `a` is after instant `b`, whatever their spelling (fractions, offsets)."""
    first, second = _parse_instant(a), _parse_instant(b)
    if first is None or second is None:
        return a > b
    return first > second


def _is_newer(incoming: MappedResource, version: str | None, updated: str | None) -> bool:
    """Whether `incoming` should replace the stored (version, updated) of the same resource."""
    new_time, old_time = _parse_instant(incoming.last_updated), _parse_instant(updated)
    if new_time is not None and old_time is not None and new_time != old_time:
        return new_time > old_time
    if incoming.version_id and version and incoming.version_id.isdigit() and version.isdigit():
        return int(incoming.version_id) >= int(version)
    return True  # no usable ordering: the latest read wins, as a plain re-load would


class NodeStore:
    """The node's store. Open with `NodeStore.open(path, pseudonym_key)`."""

    def __init__(
        self, db: sqlite_utils.Database, pseudonym_key: bytes, at_rest: AtRest = PLAIN
    ) -> None:
        self.db = db
        self._pseudonym_key = pseudonym_key
        self.at_rest = at_rest

    @classmethod
    def open(cls, path: Path, pseudonym_key: bytes, *, at_rest: AtRest = PLAIN) -> NodeStore:
        try:
            private_db(path)
            conn = sqlite3.connect(path, isolation_level=None, timeout=30)
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
            migrate(conn)
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"cannot open node store {path}: {exc}") from exc
        return cls(sqlite_utils.Database(conn), pseudonym_key, at_rest)

    @property
    def conn(self) -> sqlite3.Connection:
        return self.db.conn

    def close(self) -> None:
        self.db.conn.close()

    @property
    def pseudonym_key(self) -> bytes:
        return self._pseudonym_key

    def resource_json(self, value: str | bytes, rtype: str, rid: str) -> str:
        """A `resources.json` value as text, opened when the home seals it."""
        return self.at_rest.open_text(value, resource_label(rtype, rid), where=f"{rtype}/{rid}")

    def pseudonym(self, patient_id: str) -> str:
        digest = hmac.new(self._pseudonym_key, patient_id.encode(), hashlib.sha256)
        return digest.hexdigest()[:20]

    def split_draws(self, study: str, patient_ids: Sequence[str]) -> list[float]:
        """Per patient, a number in [0, 1) fixed by this node's secret, the study name and the
        patient alone: HMAC-SHA256, under a split key derived from the pseudonym key with its
        own label, of the study name and the patient's pseudonym, its first 53 bits over 2⁵³.

        A study's keyed split puts a patient in test when its draw is below the test fraction,
        so one patient's side never depends on who else is in the store.
        """
        key = hmac.new(self._pseudonym_key, _SPLIT_KEY_LABEL, hashlib.sha256).digest()
        prefix = study.encode() + b"\x00"
        draws = []
        for patient_id in patient_ids:
            message = prefix + self.pseudonym(patient_id).encode()
            digest = hmac.new(key, message, hashlib.sha256).digest()
            draws.append((int.from_bytes(digest[:8], "big") >> 11) / 2**53)
        return draws

    def cohort_hashes(self, patient_ids: Iterable[str]) -> frozenset[str]:
        """A study's cohort as the site ledger records it: per patient, HMAC-SHA256 of its
        pseudonym under a key derived from the pseudonym key with its own label. The same for
        every study (so cohorts compare), and neither the raw id nor the logged pseudonym."""
        key = hmac.new(self._pseudonym_key, _COHORT_KEY_LABEL, hashlib.sha256).digest()
        return frozenset(
            hmac.new(key, self.pseudonym(p).encode(), hashlib.sha256).hexdigest()
            for p in patient_ids
        )

    def transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        return immediate(self.conn)

    def write_batch(self, batch: Sequence[MappedResource]) -> list[WriteOutcome]:
        """Store a batch atomically; return each resource's outcome, in order."""
        now = utc_now()
        with self.transaction() as conn:
            existing = self._existing(conn, batch)
            outcomes: list[WriteOutcome] = []
            replace: list[MappedResource] = []
            for item in batch:
                outcome = self._decide(item, existing.get((item.type, item.id)))
                outcomes.append(outcome)
                if outcome in (WriteOutcome.STORED, WriteOutcome.UPDATED):
                    replace.append(item)
                    existing[(item.type, item.id)] = (item.version_id, item.last_updated, item.hash)
            self._delete_derived(
                conn, [r for r, o in zip(batch, outcomes, strict=True) if o is WriteOutcome.UPDATED]
            )
            self._insert(conn, _last_of_each(replace), now)
        return outcomes

    @staticmethod
    def _decide(
        item: MappedResource, old: tuple[str | None, str | None, str] | None
    ) -> WriteOutcome:
        if old is None:
            return WriteOutcome.STORED
        version, updated, digest = old
        if digest == item.hash:
            return WriteOutcome.UNCHANGED
        if not _is_newer(item, version, updated):
            return WriteOutcome.STALE
        return WriteOutcome.UPDATED

    @staticmethod
    def _existing(
        conn: sqlite3.Connection, batch: Sequence[MappedResource]
    ) -> dict[tuple[str, str], tuple[str | None, str | None, str]]:
        found: dict[tuple[str, str], tuple[str | None, str | None, str]] = {}
        by_type: dict[str, list[str]] = {}
        for item in batch:
            by_type.setdefault(item.type, []).append(item.id)
        for rtype, ids in by_type.items():
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                marks = ",".join("?" * len(chunk))
                rows = conn.execute(
                    "SELECT id, version_id, last_updated, hash FROM resources "
                    f"WHERE type = ? AND id IN ({marks})",
                    [rtype, *chunk],
                )
                for rid, version, updated, digest in rows:
                    found[(rtype, rid)] = (version, updated, digest)
        return found

    @staticmethod
    def _delete_derived(conn: sqlite3.Connection, items: Iterable[MappedResource]) -> None:
        for item in items:
            if item.type == "Observation":
                conn.execute("DELETE FROM observations WHERE resource_id = ?", (item.id,))
            elif item.type == "Condition":
                conn.execute("DELETE FROM conditions WHERE resource_id = ?", (item.id,))
            elif item.type in ("MedicationRequest", "MedicationStatement"):
                conn.execute(
                    "DELETE FROM medications WHERE resource_type = ? AND resource_id = ?",
                    (item.type, item.id),
                )

    def _insert(self, conn: sqlite3.Connection, items: list[MappedResource], now: str) -> None:
        conn.executemany(
            "INSERT INTO resources (type, id, version_id, last_updated, patient_id, hash, json, "
            "ingested_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (type, id) DO UPDATE SET "
            "version_id = excluded.version_id, last_updated = excluded.last_updated, "
            "patient_id = excluded.patient_id, hash = excluded.hash, json = excluded.json, "
            "ingested_at = excluded.ingested_at",
            [
                (
                    r.type,
                    r.id,
                    r.version_id,
                    r.last_updated,
                    r.patient_id,
                    r.hash,
                    self.at_rest.seal_text(r.json, resource_label(r.type, r.id)),
                    now,
                )
                for r in items
            ],
        )
        seal = self.at_rest.seal_field
        conn.executemany(
            "INSERT OR REPLACE INTO patients VALUES (?, ?, ?, ?, ?, ?)",
            [
                (p.id, self.pseudonym(p.id), *(seal(v, field_label("patients", (p.id,), c))
                 for c, v in (("birth_year", p.birth_year), ("birth_date", p.birth_date),
                              ("sex", p.sex))), int(p.deceased))
                for r in items
                if (p := r.patient) is not None
            ],
        )  # fmt: skip
        conn.executemany(
            "INSERT OR REPLACE INTO observations VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (o.resource_id, o.component, o.patient_id, o.code,
                 *(seal(v, field_label("observations", (o.resource_id, o.component, o.code), c))
                   for c, v in (("value", o.value), ("value_code", o.value_code),
                                ("unit", o.unit))), o.effective)
                for r in items
                for o in r.observations
            ],
        )  # fmt: skip
        conditions = [r for r in items if r.type == "Condition"]
        conn.executemany(
            "INSERT OR REPLACE INTO conditions VALUES (?, ?, ?, ?, ?)",
            [
                (c.resource_id, c.patient_id, c.code, c.time,
                 seal(c.status, field_label("conditions", (c.resource_id, c.code),
                                            "clinical_status")))
                for r in conditions
                for c in r.coded
            ],
        )  # fmt: skip
        conn.executemany(
            "INSERT OR REPLACE INTO medications VALUES (?, ?, ?, ?, ?, ?)",
            [
                (r.type, c.resource_id, c.patient_id, c.code,
                 *(seal(v, field_label("medications", (r.type, c.resource_id, c.code), col))
                   for col, v in (("status", c.status), ("authored", c.time))))
                for r in items
                if r.type != "Condition"
                for c in r.coded
            ],
        )  # fmt: skip

    # -- cursors and runs -------------------------------------------------------------------

    def cursor(self, source: str, resource_type: str) -> str | None:
        row = self.conn.execute(
            "SELECT last_updated FROM cursors WHERE source = ? AND resource_type = ?",
            (source, resource_type),
        ).fetchone()
        return None if row is None else str(row[0])

    def set_cursor(self, source: str, resource_type: str, last_updated: str) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO cursors VALUES (?, ?, ?, ?)",
            (source, resource_type, last_updated, utc_now()),
        )

    def record_run(self, source: str, started_at: str, report_json: str) -> None:
        self.conn.execute(
            "INSERT INTO ingest_runs (source, started_at, finished_at, report) VALUES (?,?,?,?)",
            (source, started_at, utc_now(), report_json),
        )

    # -- study approvals ----------------------------------------------------------------------

    def approve(self, study: str, digest: str, spec_json: str) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO approvals VALUES (?, ?, ?, ?)",
            (study, digest, spec_json, utc_now()),
        )

    def approval(self, study: str) -> tuple[str, str] | None:
        """(digest, spec JSON) of the approved version of `study`, if any."""
        row = self.conn.execute(
            "SELECT digest, spec FROM approvals WHERE study = ?", (study,)
        ).fetchone()
        return None if row is None else (str(row[0]), str(row[1]))

    # -- reporting --------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        counts = dict(
            self.conn.execute("SELECT type, count(*) FROM resources GROUP BY type ORDER BY type")
        )
        cursors = [
            {"source": s, "resource_type": t, "last_updated": lu, "synced_at": at}
            for s, t, lu, at in self.conn.execute(
                "SELECT source, resource_type, last_updated, synced_at FROM cursors ORDER BY 1, 2"
            )
        ]
        last = self.conn.execute("SELECT max(finished_at) FROM ingest_runs").fetchone()[0]
        patients = self.conn.execute("SELECT count(*) FROM patients").fetchone()[0]
        return {"resources": counts, "patients": patients, "last_sync": last, "cursors": cursors}


def resource_label(rtype: str, rid: str) -> str:
    """What a sealed `resources.json` value is sealed for: a row moved to another resource's
    place does not open."""
    return f"resources/{rtype}/{rid}"


def field_label(table: str, key: Sequence[object], column: str) -> str:
    """What a sealed value of a normalised table is sealed for: its table, row key and column."""
    return "/".join([table, *map(str, key), column])


def _last_of_each(items: list[MappedResource]) -> list[MappedResource]:
    """Keep the last write of each (type, id) within a batch (a file may repeat a resource)."""
    latest: dict[tuple[str, str], MappedResource] = {}
    for item in items:
        latest[(item.type, item.id)] = item
    return list(latest.values())
