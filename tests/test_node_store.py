"""NodeStore: batches, versions, migrations, atomicity, pseudonyms (aipipe.store)."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
import sqlite_utils
from hypothesis import given
from hypothesis import strategies as st

from aipipe.errors import StoreError
from aipipe.fhir.codes import LOINC
from aipipe.fhir.mapping import MappedResource, map_resource
from aipipe.store.node_store import NodeStore, WriteOutcome
from aipipe.store.schema import MIGRATIONS

KEY = b"k" * 32


def patient(pid: str = "p1", **fields: Any) -> MappedResource:
    return map_resource({"resourceType": "Patient", "id": pid, "gender": "female", **fields})


def observation(
    oid: str = "o1",
    *,
    codes: tuple[str, ...] = ("2339-0",),
    value: float = 95.0,
    version: str | None = None,
    updated: str | None = None,
) -> MappedResource:
    meta = {k: v for k, v in (("versionId", version), ("lastUpdated", updated)) if v is not None}
    return map_resource(
        {
            "resourceType": "Observation",
            "id": oid,
            "meta": meta,
            "subject": {"reference": "Patient/p1"},
            "code": {"coding": [{"system": LOINC, "code": code} for code in codes]},
            "valueQuantity": {"value": value, "unit": "mg/dL"},
        }
    )


def rows(store: NodeStore, sql: str) -> list[tuple[Any, ...]]:
    return [tuple(row) for row in store.conn.execute(sql)]


def count(store: NodeStore, table: str) -> int:
    return int(store.conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


# -- batches and versions -----------------------------------------------------------------


def test_a_new_batch_is_stored_with_its_derived_rows(store: NodeStore) -> None:
    outcomes = store.write_batch([patient(), observation(codes=("2339-0", "2345-7"))])

    assert outcomes == [WriteOutcome.STORED, WriteOutcome.STORED]
    assert (count(store, "resources"), count(store, "patients"), count(store, "observations")) == (
        2,
        1,
        2,
    )


def test_writing_the_same_batch_twice_stores_nothing_twice(store: NodeStore) -> None:
    batch = [patient(), observation("o1"), observation("o2", codes=("2093-3",))]
    store.write_batch(batch)
    before = {t: count(store, t) for t in ("resources", "patients", "observations")}

    outcomes = store.write_batch(batch)

    assert outcomes == [WriteOutcome.UNCHANGED] * 3
    assert {t: count(store, t) for t in ("resources", "patients", "observations")} == before


def test_a_newer_version_replaces_the_resource_and_its_derived_rows(store: NodeStore) -> None:
    store.write_batch(
        [
            observation(
                codes=("2339-0", "2345-7"), value=95, version="1", updated="2024-01-01T00:00Z"
            )
        ]
    )
    newer = observation(codes=("2339-0",), value=120, version="2", updated="2024-02-01T00:00Z")

    outcomes = store.write_batch([newer])

    assert outcomes == [WriteOutcome.UPDATED]
    assert rows(store, "SELECT code, value FROM observations") == [(f"{LOINC}|2339-0", 120.0)]
    assert rows(store, "SELECT version_id, hash FROM resources") == [("2", newer.hash)]


def test_an_older_version_is_stale_and_ignored(store: NodeStore) -> None:
    current = observation(value=120, version="2", updated="2024-02-01T00:00:00Z")
    store.write_batch([current])

    outcomes = store.write_batch([observation(value=95, version="1", updated="2024-01-01T00:00Z")])

    assert outcomes == [WriteOutcome.STALE]
    assert rows(store, "SELECT value FROM observations") == [(120.0,)]
    assert rows(store, "SELECT hash FROM resources") == [(current.hash,)]


def test_last_updated_is_compared_as_an_instant_not_as_text(store: NodeStore) -> None:
    store.write_batch([observation(value=120, updated="2024-01-01T09:00:00Z")])
    # 10:00 at +02:00 is 08:00Z: earlier, although it sorts later as text.
    earlier = observation(value=95, updated="2024-01-01T10:00:00+02:00")

    outcomes = store.write_batch([earlier])

    assert outcomes == [WriteOutcome.STALE]


def test_at_the_same_instant_a_higher_version_id_wins(store: NodeStore) -> None:
    store.write_batch([observation(value=95, version="9", updated="2024-01-01T00:00:00Z")])

    outcomes = store.write_batch(
        [observation(value=120, version="10", updated="2024-01-01T00:00:00Z")]
    )

    assert outcomes == [WriteOutcome.UPDATED]
    assert rows(store, "SELECT value FROM observations") == [(120.0,)]


def test_at_the_same_instant_a_lower_version_id_is_stale(store: NodeStore) -> None:
    store.write_batch([observation(value=120, version="10", updated="2024-01-01T00:00:00Z")])

    outcomes = store.write_batch(
        [observation(value=95, version="9", updated="2024-01-01T00:00:00Z")]
    )

    assert outcomes == [WriteOutcome.STALE]


def test_a_resource_repeated_inside_one_batch_is_stored_once(store: NodeStore) -> None:
    outcomes = store.write_batch([observation(), observation()])

    assert outcomes == [WriteOutcome.STORED, WriteOutcome.UNCHANGED]
    assert (count(store, "resources"), count(store, "observations")) == (1, 1)


def test_within_one_batch_a_later_newer_version_wins(store: NodeStore) -> None:
    older = observation(codes=("2339-0", "2345-7"), value=95, updated="2024-01-01T00:00:00Z")
    newer = observation(codes=("2339-0",), value=120, updated="2024-02-01T00:00:00Z")

    outcomes = store.write_batch([older, newer])

    assert outcomes == [WriteOutcome.STORED, WriteOutcome.UPDATED]
    assert rows(store, "SELECT code, value FROM observations") == [(f"{LOINC}|2339-0", 120.0)]


def test_within_one_batch_a_later_older_version_is_stale(store: NodeStore) -> None:
    newer = observation(value=120, updated="2024-02-01T00:00:00Z")
    older = observation(value=95, updated="2024-01-01T00:00:00Z")

    outcomes = store.write_batch([newer, older])

    assert outcomes == [WriteOutcome.STORED, WriteOutcome.STALE]
    assert rows(store, "SELECT value FROM observations") == [(120.0,)]


def test_a_patient_update_replaces_its_patient_row(store: NodeStore) -> None:
    store.write_batch([patient(birthDate="1960-01-01")])

    store.write_batch([patient(birthDate="1961-01-01")])

    assert rows(store, "SELECT id, birth_year FROM patients") == [("p1", 1961)]


def test_status_counts_resources_per_type_and_patients(store: NodeStore) -> None:
    store.write_batch([patient("p1"), patient("p2"), observation("o1")])

    status = store.status()

    assert status["resources"] == {"Observation": 1, "Patient": 2}
    assert status["patients"] == 2
    assert status["last_sync"] is None


# -- atomicity ----------------------------------------------------------------------------


class Boom(RuntimeError):
    pass


def fail_on_patient_rows(store: NodeStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the insert fail after the resources rows of a batch are written."""

    def boom(patient_id: str) -> str:
        raise Boom(patient_id)

    monkeypatch.setattr(store, "pseudonym", boom)


def test_a_batch_that_fails_midway_leaves_nothing_behind(
    store: NodeStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    fail_on_patient_rows(store, monkeypatch)

    with pytest.raises(Boom):
        store.write_batch([observation("o1"), patient("p1"), observation("o2")])

    assert [count(store, t) for t in ("resources", "patients", "observations")] == [0, 0, 0]


def test_a_failed_update_keeps_the_previous_version_and_its_rows(
    store: NodeStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.write_batch([observation(value=95, updated="2024-01-01T00:00:00Z")])
    fail_on_patient_rows(store, monkeypatch)

    with pytest.raises(Boom):
        store.write_batch([observation(value=120, updated="2024-02-01T00:00:00Z"), patient()])

    assert rows(store, "SELECT value FROM observations") == [(95.0,)]
    assert count(store, "resources") == 1


def test_the_store_takes_new_batches_after_a_failed_one(
    store: NodeStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    fail_on_patient_rows(store, monkeypatch)
    with pytest.raises(Boom):
        store.write_batch([patient()])
    monkeypatch.undo()

    outcomes = store.write_batch([patient()])

    assert outcomes == [WriteOutcome.STORED]


# -- schema -------------------------------------------------------------------------------


def user_version(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])
    finally:
        conn.close()


def test_a_new_store_is_at_the_schema_version_of_the_last_migration(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite"

    NodeStore.open(path, KEY).close()

    assert user_version(path) == len(MIGRATIONS)


def test_reopening_a_store_keeps_its_data(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite"
    first = NodeStore.open(path, KEY)
    first.write_batch([patient()])
    first.close()

    second = NodeStore.open(path, KEY)
    try:
        outcomes = second.write_batch([patient()])
    finally:
        second.close()

    assert outcomes == [WriteOutcome.UNCHANGED]
    assert user_version(path) == len(MIGRATIONS)


def test_a_store_of_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    conn.close()

    with pytest.raises(StoreError, match=f"schema version {len(MIGRATIONS) + 1} is newer"):
        NodeStore.open(path, KEY)


def test_a_file_that_is_not_sqlite_is_refused_as_a_store_error(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite"
    path.write_bytes(b"this is not a database" * 100)

    with pytest.raises(StoreError, match="cannot open node store"):
        NodeStore.open(path, KEY)


# -- pseudonyms ---------------------------------------------------------------------------


def test_a_stored_patient_carries_its_pseudonym_not_its_id(store: NodeStore) -> None:
    store.write_batch([patient("p1")])

    ((pseudonym,),) = rows(store, "SELECT pseudonym FROM patients WHERE id = 'p1'")

    assert pseudonym == store.pseudonym("p1")
    assert "p1" not in pseudonym


def test_the_pseudonym_is_stable_across_openings_with_the_same_key(tmp_path: Path) -> None:
    first = NodeStore.open(tmp_path / "a.sqlite", KEY)
    second = NodeStore.open(tmp_path / "b.sqlite", KEY)
    try:
        same = first.pseudonym("p1") == second.pseudonym("p1")
    finally:
        first.close()
        second.close()

    assert same


def test_the_pseudonym_depends_on_the_node_key(tmp_path: Path) -> None:
    first = NodeStore.open(tmp_path / "a.sqlite", KEY)
    second = NodeStore.open(tmp_path / "b.sqlite", b"other key")
    try:
        differ = first.pseudonym("p1") != second.pseudonym("p1")
    finally:
        first.close()
        second.close()

    assert differ


@given(st.from_regex(r"[A-Za-z0-9\-.]{1,64}", fullmatch=True))
def test_a_pseudonym_is_twenty_hex_digits_unlike_the_id(patient_id: str) -> None:
    pseudonym = NodeStore(sqlite_utils.Database(memory=True), KEY).pseudonym(patient_id)

    assert len(pseudonym) == 20 and set(pseudonym) <= set("0123456789abcdef")
    assert pseudonym != patient_id
