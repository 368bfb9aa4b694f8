"""Ingest: FHIR files and servers into a NodeStore, with a per-type report (aipipe.node.ingest)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aipipe.fhir.codes import LOINC
from aipipe.node.ingest import IngestReport, ingest_files, ingest_server
from aipipe.store.node_store import NodeStore

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
BUNDLES = DATA / "synthea_fhir_r4" / "bundles"
needs_synthea = pytest.mark.skipif(not BUNDLES.is_dir(), reason=f"Synthea data missing: {BUNDLES}")
KEY = b"k" * 32

# The inventory in shared/data/synthea_fhir_r4/README.md, per bundle entry.
README_INVENTORY = {
    "Observation": 7057,
    "Condition": 326,
    "Patient": 40,
    "MedicationRequest": 161,
    "DiagnosticReport": 571,
    "Encounter": 875,
    "Claim": 1036,
}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[NodeStore]:
    opened = NodeStore.open(tmp_path / "store.sqlite", KEY)
    yield opened
    opened.close()


# -- the 40 Synthea bundles ---------------------------------------------------------------


@pytest.fixture(scope="module")
def synthea(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NodeStore, IngestReport]]:
    if not BUNDLES.is_dir():
        pytest.skip(f"Synthea data missing: {BUNDLES}")
    store = NodeStore.open(tmp_path_factory.mktemp("synthea") / "store.sqlite", KEY)
    report = ingest_files(store, [BUNDLES])
    yield store, report
    store.close()


@pytest.fixture(scope="module")
def unique_ids() -> Counter[str]:
    """Distinct (type, id) per type in the bundles, counted with json, not with aipipe."""
    if not BUNDLES.is_dir():
        pytest.skip(f"Synthea data missing: {BUNDLES}")
    seen: set[tuple[str, str]] = set()
    for path in BUNDLES.glob("*.json"):
        for entry in json.loads(path.read_text(encoding="utf-8"))["entry"]:
            seen.add((entry["resource"]["resourceType"], entry["resource"]["id"]))
    return Counter(rtype for rtype, _ in seen)


def scalar(store: NodeStore, sql: str) -> Any:
    return store.conn.execute(sql).fetchone()[0]


@needs_synthea
@pytest.mark.parametrize(("rtype", "expected"), sorted(README_INVENTORY.items()))
def test_every_synthea_resource_of_a_type_is_read_and_stored(
    synthea: tuple[NodeStore, IngestReport], rtype: str, expected: int
) -> None:
    store, report = synthea

    counts = report.types[rtype]

    assert (counts.read, counts.stored) == (expected, expected)
    assert store.status()["resources"][rtype] == expected


@needs_synthea
def test_shared_organizations_and_practitioners_are_stored_once(
    synthea: tuple[NodeStore, IngestReport], unique_ids: Counter[str]
) -> None:
    store, report = synthea

    for rtype in ("Organization", "Practitioner"):
        counts = report.types[rtype]
        assert counts.read == 69
        assert counts.stored == unique_ids[rtype] < 69
        assert counts.unchanged == 69 - unique_ids[rtype]
        assert store.status()["resources"][rtype] == unique_ids[rtype]


@needs_synthea
def test_the_store_holds_each_distinct_resource_of_the_bundles(
    synthea: tuple[NodeStore, IngestReport], unique_ids: Counter[str]
) -> None:
    store, _ = synthea

    assert store.status()["resources"] == dict(unique_ids)


@needs_synthea
def test_no_synthea_resource_is_rejected_or_warned_about(
    synthea: tuple[NodeStore, IngestReport],
) -> None:
    _, report = synthea

    assert (report.total("rejected"), dict(report.reasons), dict(report.warnings)) == (0, {}, {})
    assert report.files == 40


@needs_synthea
def test_each_blood_pressure_panel_gives_a_systolic_and_a_diastolic_row(
    synthea: tuple[NodeStore, IngestReport],
) -> None:
    store, _ = synthea

    systolic = scalar(store, f"SELECT count(*) FROM observations WHERE code = '{LOINC}|8480-6'")
    diastolic = scalar(store, f"SELECT count(*) FROM observations WHERE code = '{LOINC}|8462-4'")

    assert (systolic, diastolic) == (401, 401)


@needs_synthea
@pytest.mark.parametrize("table", ["observations", "conditions", "medications"])
def test_every_derived_row_references_a_stored_patient(
    synthea: tuple[NodeStore, IngestReport], table: str
) -> None:
    store, _ = synthea

    orphans = scalar(
        store, f"SELECT count(*) FROM {table} WHERE patient_id NOT IN (SELECT id FROM patients)"
    )

    assert scalar(store, f"SELECT count(*) FROM {table}") > 0
    assert orphans == 0


@needs_synthea
def test_a_second_ingest_of_the_same_bundles_changes_nothing(
    synthea: tuple[NodeStore, IngestReport],
) -> None:
    store, first = synthea
    before = store.status()["resources"]

    second = ingest_files(store, [BUNDLES])

    assert second.total("read") == first.total("read")
    assert second.total("unchanged") == second.total("read")
    assert store.status()["resources"] == before


# -- files with damage --------------------------------------------------------------------


def test_bad_lines_are_counted_with_reasons_and_the_rest_is_stored(
    store: NodeStore, tmp_path: Path
) -> None:
    bad_value = {
        "resourceType": "Observation",
        "id": "o1",
        "subject": {"reference": "Patient/p1"},
        "code": {"coding": [{"system": LOINC, "code": "2339-0"}]},
        "valueQuantity": {"value": "12"},
    }
    lines = [json.dumps({"resourceType": "Patient", "id": "p1"}), "{oops", json.dumps(bad_value)]
    (tmp_path / "mixed.ndjson").write_text("\n".join(lines), encoding="utf-8")

    report = ingest_files(store, [tmp_path])

    assert (report.types["Patient"].stored, report.types["Observation"].rejected) == (1, 1)
    assert report.types["unknown"].rejected == 1
    assert dict(report.reasons) == {
        "unknown: invalid JSON line": 1,
        "Observation.valueQuantity.value is not a number": 1,
    }


def test_an_unconvertible_unit_is_reported_as_a_warning_and_stored(
    store: NodeStore, tmp_path: Path
) -> None:
    glucose = {
        "resourceType": "Observation",
        "id": "o1",
        "subject": {"reference": "Patient/p1"},
        "code": {"coding": [{"system": LOINC, "code": "2339-0"}]},
        "valueQuantity": {"value": 5, "unit": "g/L"},
    }
    (tmp_path / "obs.ndjson").write_text(json.dumps(glucose), encoding="utf-8")

    report = ingest_files(store, [tmp_path])

    assert report.types["Observation"].stored == 1
    assert list(report.warnings) == [f"unknown unit 'g/L' for glucose ({LOINC}|2339-0)"]


def test_an_ingest_run_is_recorded_as_the_last_sync(store: NodeStore, tmp_path: Path) -> None:
    (tmp_path / "p.ndjson").write_text('{"resourceType":"Patient","id":"p1"}', encoding="utf-8")

    ingest_files(store, [tmp_path])

    assert store.status()["last_sync"] is not None


# -- ingest_server with a fake source -----------------------------------------------------


class FakeSource:
    """A ResourceSource over fixed resources that records the `since` of each search."""

    def __init__(self, resources: dict[str, list[dict[str, Any]]]) -> None:
        self.resources = resources
        self.calls: list[tuple[str, str | None]] = []

    def iter_resources(self, resource_type: str, since: str | None) -> Iterator[dict[str, Any]]:
        self.calls.append((resource_type, since))
        for resource in self.resources.get(resource_type, []):
            if since is None or resource["meta"]["lastUpdated"] > since:
                yield resource


def patient(pid: str, updated: str) -> dict[str, Any]:
    return {"resourceType": "Patient", "id": pid, "meta": {"lastUpdated": updated}}


def condition(cid: str, updated: str) -> dict[str, Any]:
    return {
        "resourceType": "Condition",
        "id": cid,
        "meta": {"lastUpdated": updated},
        "subject": {"reference": "Patient/p1"},
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "44054006"}]},
    }


SERVER = "https://ehr.example.org/fhir"


def pull(store: NodeStore, source: FakeSource, **knobs: Any) -> IngestReport:
    types = knobs.pop("resource_types", ["Patient", "Condition"])
    return ingest_server(store, source, source_key=SERVER, resource_types=types, **knobs)


def test_a_pull_advances_each_cursor_to_the_latest_last_updated(store: NodeStore) -> None:
    source = FakeSource(
        {
            "Patient": [
                patient("p1", "2024-03-01T00:00:00Z"),
                patient("p2", "2024-05-01T00:00:00Z"),
            ],
            "Condition": [condition("c1", "2024-04-01T00:00:00Z")],
        }
    )

    pull(store, source)

    assert store.cursor(SERVER, "Patient") == "2024-05-01T00:00:00Z"
    assert store.cursor(SERVER, "Condition") == "2024-04-01T00:00:00Z"


def test_the_next_pull_asks_for_resources_updated_after_the_cursor(store: NodeStore) -> None:
    source = FakeSource({"Patient": [patient("p1", "2024-03-01T00:00:00Z")], "Condition": []})
    pull(store, source)

    pull(store, source)

    assert source.calls == [
        ("Patient", None),
        ("Condition", None),
        ("Patient", "2024-03-01T00:00:00Z"),
        ("Condition", None),
    ]


def test_a_pull_with_nothing_new_leaves_the_cursor_where_it_was(store: NodeStore) -> None:
    source = FakeSource({"Patient": [patient("p1", "2024-03-01T00:00:00Z")]})
    pull(store, source, resource_types=["Patient"])

    report = pull(store, source, resource_types=["Patient"])

    assert report.types["Patient"].read == 0
    assert store.cursor(SERVER, "Patient") == "2024-03-01T00:00:00Z"


def test_an_explicit_since_overrides_the_stored_cursor(store: NodeStore) -> None:
    source = FakeSource({"Patient": [patient("p1", "2024-03-01T00:00:00Z")]})
    pull(store, source, resource_types=["Patient"])

    pull(store, source, resource_types=["Patient"], since="2020-01-01T00:00:00Z")

    assert source.calls[-1] == ("Patient", "2020-01-01T00:00:00Z")


def test_a_server_pull_reports_new_and_unchanged_resources(store: NodeStore) -> None:
    source = FakeSource({"Patient": [patient("p1", "2024-03-01T00:00:00Z")]})
    first = pull(store, source, resource_types=["Patient"])

    second = pull(store, source, resource_types=["Patient"], since="2020-01-01T00:00:00Z")

    assert (first.types["Patient"].stored, second.types["Patient"].unchanged) == (1, 1)


def test_an_interrupted_pull_keeps_the_cursors_of_the_types_it_completed(
    store: NodeStore,
) -> None:
    class Broken(FakeSource):
        def iter_resources(self, resource_type: str, since: str | None) -> Iterator[dict[str, Any]]:
            yield from super().iter_resources(resource_type, since)
            if resource_type == "Condition":
                raise ConnectionError("server went away")

    source = Broken(
        {
            "Patient": [patient("p1", "2024-03-01T00:00:00Z")],
            "Condition": [condition("c1", "2024-04-01T00:00:00Z")],
        }
    )

    with pytest.raises(ConnectionError):
        pull(store, source)

    assert store.cursor(SERVER, "Patient") == "2024-03-01T00:00:00Z"
    assert store.cursor(SERVER, "Condition") is None


@pytest.mark.parametrize(
    ("earlier", "later"),
    [
        ("2024-03-01T00:00:00Z", "2024-03-01T00:00:00.500Z"),
        ("2024-03-01T10:00:00+02:00", "2024-03-01T09:00:00Z"),
    ],
    ids=["fractional-seconds", "time-zone-offsets"],
)
def test_the_cursor_is_the_latest_instant_whatever_its_spelling(
    store: NodeStore, earlier: str, later: str
) -> None:
    source = FakeSource({"Patient": [patient("p1", earlier), patient("p2", later)]})

    pull(store, source, resource_types=["Patient"])

    assert store.cursor(SERVER, "Patient") == later
