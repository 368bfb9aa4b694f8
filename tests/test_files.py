"""Reading FHIR files: NDJSON, streamed Bundles, fullUrl resolution, damage (aipipe.fhir.files)."""

from __future__ import annotations

import gzip
import json
import tracemalloc
import uuid
from pathlib import Path
from typing import Any

import pytest

from aipipe.errors import SourceError
from aipipe.fhir.files import SourceItem, discover, read_bundle, read_file, read_ndjson

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
BUNDLES = DATA / "synthea_fhir_r4" / "bundles"
needs_synthea = pytest.mark.skipif(not BUNDLES.is_dir(), reason=f"Synthea data missing: {BUNDLES}")


def patient(pid: str) -> dict[str, Any]:
    return {"resourceType": "Patient", "id": pid, "gender": "female"}


def observation(oid: str | None, subject: str) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "2339-0"}]},
        "subject": {"reference": subject},
        "valueQuantity": {"value": 95, "unit": "mg/dL"},
    }
    if oid is not None:
        resource["id"] = oid
    return resource


def write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def good(items: list[SourceItem]) -> list[SourceItem]:
    return [item for item in items if item.error is None]


def errors(items: list[SourceItem]) -> list[SourceItem]:
    return [item for item in items if item.error is not None]


# -- NDJSON -------------------------------------------------------------------------------


def test_ndjson_damage_is_reported_per_line_and_the_valid_lines_are_intact(tmp_path: Path) -> None:
    first, second = patient("p1"), observation("o1", "Patient/p1")
    lines = [json.dumps(first), "", "{not json", json.dumps(second), json.dumps(patient("p2"))[:20]]
    path = tmp_path / "Mixed.ndjson"
    path.write_text("\n".join(lines), encoding="utf-8")

    items = list(read_ndjson(path))

    assert [item.resource for item in good(items)] == [first, second]
    assert [(item.origin, item.error) for item in errors(items)] == [
        ("Mixed.ndjson:3", "invalid JSON line"),
        ("Mixed.ndjson:5", "invalid JSON line"),
    ]


def test_an_ndjson_line_keeps_its_raw_text(tmp_path: Path) -> None:
    raw = '{"resourceType":"Patient",  "id":"p1"}'
    path = tmp_path / "Patient.ndjson"
    path.write_text(raw + "\n", encoding="utf-8")

    (item,) = read_ndjson(path)

    assert item.raw_text == raw


def test_a_gzipped_ndjson_file_is_read_like_a_plain_one(tmp_path: Path) -> None:
    path = tmp_path / "Patient.ndjson.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write(json.dumps(patient("p1")) + "\n" + json.dumps(patient("p2")) + "\n")

    items = list(read_file(path))

    assert [item.resource["id"] for item in items] == ["p1", "p2"]


def test_an_ndjson_line_holding_a_bundle_yields_its_entries(tmp_path: Path) -> None:
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": patient("p")}]}
    path = tmp_path / "Bundles.ndjson"
    path.write_text(json.dumps(bundle) + "\n", encoding="utf-8")

    items = list(read_ndjson(path))

    assert [item.resource for item in items] == [patient("p")]


# -- Bundles ------------------------------------------------------------------------------


def transaction_with_urn_references(patient_uuid: str, obs_uuid: str) -> dict[str, Any]:
    pat = patient("ignored")
    del pat["id"]
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": f"urn:uuid:{obs_uuid}",
                "resource": observation(None, f"urn:uuid:{patient_uuid}"),
                "request": {"method": "POST", "url": "Observation"},
            },
            {
                "fullUrl": f"urn:uuid:{patient_uuid}",
                "resource": pat,
                "request": {"method": "POST", "url": "Patient"},
            },
        ],
    }


def test_a_transaction_bundle_resolves_urn_uuid_references_to_type_and_id(tmp_path: Path) -> None:
    patient_uuid, obs_uuid = str(uuid.uuid4()), str(uuid.uuid4())
    path = write_json(tmp_path / "tx.json", transaction_with_urn_references(patient_uuid, obs_uuid))

    obs, pat = (item.resource for item in read_bundle(path))

    assert obs["subject"] == {"reference": f"Patient/{patient_uuid}"}
    assert obs["id"] == obs_uuid
    assert pat["id"] == patient_uuid


def test_reading_a_transaction_bundle_twice_gives_the_same_ids(tmp_path: Path) -> None:
    bundle = transaction_with_urn_references(str(uuid.uuid4()), str(uuid.uuid4()))
    path = write_json(tmp_path / "tx.json", bundle)

    first = [item.resource for item in read_bundle(path)]
    second = [item.resource for item in read_bundle(path)]

    assert first == second


def test_a_reference_by_an_absolute_full_url_is_rewritten_too(tmp_path: Path) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"fullUrl": "https://ehr.example.org/fhir/Patient/p7", "resource": patient("p7")},
            {
                "resource": observation("o1", "https://ehr.example.org/fhir/Patient/p7"),
                "request": {"method": "PUT", "url": "Observation/o1"},
            },
        ],
    }
    path = write_json(tmp_path / "batch.json", bundle)

    items = list(read_bundle(path))

    assert [item.error for item in items] == [None, None]
    assert items[1].resource["subject"] == {"reference": "Patient/p7"}


def test_a_batch_bundle_yields_each_entry_with_its_own_id(tmp_path: Path) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"resource": patient("p1"), "request": {"method": "PUT", "url": "Patient/p1"}},
            {"resource": observation("o1", "Patient/p1"), "request": {"method": "POST"}},
        ],
    }
    path = write_json(tmp_path / "batch.json", bundle)

    items = list(read_bundle(path))

    assert [item.resource for item in items] == [patient("p1"), observation("o1", "Patient/p1")]
    assert [item.origin for item in items] == ["batch.json#entry0", "batch.json#entry1"]


def test_a_delete_entry_is_reported_and_not_applied(tmp_path: Path) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"resource": patient("p1"), "request": {"method": "DELETE", "url": "Patient/p1"}}
        ],
    }
    path = write_json(tmp_path / "batch.json", bundle)

    (item,) = read_bundle(path)

    assert (item.resource, item.error) == (None, "DELETE entries are not applied")


def test_a_searchset_skips_its_operation_outcome_entry(tmp_path: Path) -> None:
    issue = {"severity": "warning", "code": "processing", "diagnostics": "too many"}
    bundle = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [
            {"resource": patient("p1"), "search": {"mode": "match"}},
            {
                "resource": {"resourceType": "OperationOutcome", "issue": [issue]},
                "search": {"mode": "outcome"},
            },
            {"resource": patient("p2"), "search": {"mode": "match"}},
        ],
    }
    path = write_json(tmp_path / "search.json", bundle)

    items = list(read_bundle(path))

    assert [item.resource for item in good(items)] == [patient("p1"), patient("p2")]
    assert [item.error for item in errors(items)] == [
        "search outcome entry (OperationOutcome) skipped"
    ]


def test_an_entry_without_a_resource_is_reported(tmp_path: Path) -> None:
    bundle = {"resourceType": "Bundle", "type": "batch", "entry": [{"fullUrl": "urn:uuid:x"}]}
    path = write_json(tmp_path / "batch.json", bundle)

    (item,) = read_bundle(path)

    assert item.error == "bundle entry has no resource"


def test_a_json_file_with_a_single_resource_yields_that_resource(tmp_path: Path) -> None:
    path = write_json(tmp_path / "p1.json", patient("p1"))

    items = list(read_file(path))

    assert [item.resource for item in items] == [patient("p1")]


def entry_ends(text: str) -> list[int]:
    """Offsets just after each complete entry of a Bundle's `entry` array, parsed with json."""
    decoder = json.JSONDecoder()
    position = text.index("[", text.index('"entry"')) + 1
    ends = []
    while True:
        while text[position] in " \t\r\n,":
            position += 1
        if text[position] == "]":
            return ends
        _, position = decoder.raw_decode(text, position)
        ends.append(position)


@needs_synthea
def test_a_truncated_bundle_reports_the_damage_and_yields_the_entries_before_it(
    tmp_path: Path,
) -> None:
    source = sorted(BUNDLES.glob("*.json"))[0]
    text = source.read_text(encoding="utf-8")
    cut = len(text) // 2
    complete_before_cut = sum(1 for end in entry_ends(text) if end <= cut)
    whole = [item.resource for item in read_bundle(source)]
    truncated = tmp_path / source.name
    truncated.write_text(text[:cut], encoding="utf-8")

    items = list(read_bundle(truncated))

    (damage,) = errors(items)
    assert damage.origin == source.name
    assert damage.error is not None and damage.error.startswith("truncated or invalid JSON")
    assert [item.resource for item in good(items)] == whole[:complete_before_cut]
    assert 0 < complete_before_cut < len(whole)


@needs_synthea
def test_bundle_progress_adds_up_to_the_file_size() -> None:
    source = sorted(BUNDLES.glob("*.json"))[0]
    advanced: list[int] = []

    for _ in read_bundle(source, advanced.append):
        pass

    assert sum(advanced) == source.stat().st_size
    assert all(step >= 0 for step in advanced)


def test_ndjson_progress_adds_up_to_the_file_size(tmp_path: Path) -> None:
    path = tmp_path / "Patient.ndjson"
    path.write_text("\n".join(json.dumps(patient(f"p{i}")) for i in range(5)), encoding="utf-8")
    advanced: list[int] = []

    for _ in read_ndjson(path, advanced.append):
        pass

    assert sum(advanced) == path.stat().st_size


PATIENT_UUID = "00000000-0000-4000-8000-000000000000"


def write_large_transaction(path: Path, target_bytes: int) -> int:
    """Write a transaction Bundle of about `target_bytes`, one entry at a time; return entries."""
    # Large narratives keep the entry count (and tracemalloc's per-allocation cost) modest.
    narrative = "<div>" + "x" * 16000 + "</div>"
    patient_url = f"urn:uuid:{PATIENT_UUID}"
    count = 0
    with path.open("w", encoding="utf-8") as handle:
        handle.write('{"resourceType": "Bundle", "type": "transaction", "entry": [')
        handle.write(json.dumps({"fullUrl": patient_url, "resource": {"resourceType": "Patient"}}))
        while handle.tell() < target_bytes:
            resource = observation(None, patient_url)
            resource["text"] = {"status": "generated", "div": narrative}
            entry = {"fullUrl": f"urn:uuid:{uuid.UUID(int=count + 1)}", "resource": resource}
            handle.write(",\n" + json.dumps(entry))
            count += 1
        handle.write("]}")
    return count + 1


def test_reading_a_large_bundle_keeps_memory_far_below_the_file_size(tmp_path: Path) -> None:
    path = tmp_path / "large.json"
    entries = write_large_transaction(path, 50 * 1024 * 1024)
    tracemalloc.start()
    try:
        seen = 0
        last: SourceItem | None = None
        for item in read_bundle(path):
            seen += 1
            last = item
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert seen == entries
    assert last is not None
    assert last.resource["subject"] == {"reference": f"Patient/{PATIENT_UUID}"}
    assert peak < 30 * 1024 * 1024, f"peak traced memory {peak / 2**20:.1f} MiB"


# -- discover -----------------------------------------------------------------------------


def test_discover_expands_a_directory_to_its_fhir_files_sorted_and_recursively(
    tmp_path: Path,
) -> None:
    (tmp_path / "sub").mkdir()
    for name in ("b.ndjson", "a.json", "sub/c.ndjson.gz", "sub/d.json.gz", "notes.txt", "x.csv"):
        (tmp_path / name).write_text("{}", encoding="utf-8")

    found = discover([tmp_path])

    assert found == [
        tmp_path / "a.json",
        tmp_path / "b.ndjson",
        tmp_path / "sub" / "c.ndjson.gz",
        tmp_path / "sub" / "d.json.gz",
    ]


def test_discover_takes_a_named_file_whatever_its_suffix(tmp_path: Path) -> None:
    path = tmp_path / "export.txt"
    path.write_text("{}", encoding="utf-8")

    assert discover([path]) == [path]


def test_discover_refuses_a_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"

    with pytest.raises(SourceError, match=r"no such file or directory: .*nowhere"):
        discover([missing])


def test_discover_refuses_a_directory_without_fhir_files(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("nothing here", encoding="utf-8")

    with pytest.raises(SourceError, match=r"no \.ndjson or \.json files found"):
        discover([tmp_path])
