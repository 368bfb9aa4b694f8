"""Hostile files to ingest (issue 9, items 8 and 17): bounded depth and size, flat memory, no PHI
in what an ingest reports (aipipe.fhir.files, aipipe.node.ingest, aipipe.fhir.server)."""

from __future__ import annotations

import gzip
import json
import resource
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from aipipe.cli.app import app
from aipipe.errors import FhirServerError
from aipipe.fhir.limits import IngestLimits
from aipipe.fhir.server import FhirServerSource
from aipipe.node.ingest import ingest_files, ingest_server
from aipipe.store.node_store import NodeStore

FAKE_NAME = "Zebediah Quuxworth"


def patient(pid: str) -> dict[str, Any]:
    return {"resourceType": "Patient", "id": pid, "gender": "female"}


def line(resource: dict[str, Any]) -> bytes:
    return json.dumps(resource).encode() + b"\n"


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def deep_patient(pid: str, depth: int) -> bytes:
    return b'{"resourceType":"Patient","id":"' + pid.encode() + b'","x":' + nested(depth) + b"}"


def deep_bundle(depth: int) -> bytes:
    entries = [
        json.dumps({"fullUrl": "urn:uuid:p1", "resource": patient("p1")}).encode(),
        b'{"fullUrl":"urn:uuid:deep","resource":' + deep_patient("deep", depth) + b"}",
        json.dumps({"fullUrl": "urn:uuid:p2", "resource": patient("p2")}).encode(),
    ]
    return b'{"resourceType":"Bundle","type":"collection","entry":[' + b",".join(entries) + b"]}"


def gzip_bomb(path: Path, expanded_mib: int) -> Path:
    """A gzip file of a few hundred KB whose middle line expands to `expanded_mib` MiB.

    gzip members concatenate, so one compressed MiB of padding is repeated instead of
    compressing the whole expansion."""
    pad = gzip.compress(b"a" * (1 << 20), compresslevel=9)
    with path.open("wb") as out:
        out.write(gzip.compress(line(patient("before")) + b'{"resourceType":"Patient","pad":"'))
        for _ in range(expanded_mib):
            out.write(pad)
        out.write(gzip.compress(b'"}\n' + line(patient("after"))))
    return path


def rejected(report: Any) -> dict[str, int]:
    return dict(report.reasons)


# -- depth --------------------------------------------------------------------------------


def test_a_100k_deep_ndjson_line_is_rejected_and_the_lines_around_it_are_stored(
    store: NodeStore, tmp_path: Path
) -> None:
    source = tmp_path / "deep.ndjson"
    source.write_bytes(
        line(patient("p1")) + deep_patient("deep", 100_000) + b"\n" + line(patient("p2"))
    )

    report = ingest_files(store, [source])

    assert report.types["Patient"].stored == 2
    assert report.total("rejected") == 1
    assert any("nested deeper than" in reason for reason in rejected(report)), rejected(report)


def test_a_deeply_nested_bundle_entry_is_rejected_and_the_other_entries_are_stored(
    store: NodeStore, tmp_path: Path
) -> None:
    source = tmp_path / "deep.json"
    source.write_bytes(deep_bundle(5_000))

    report = ingest_files(store, [source])

    assert report.types["Patient"].stored == 2
    assert report.total("rejected") == 1
    assert any("nested deeper than" in reason for reason in rejected(report)), rejected(report)


def test_a_bundle_line_in_ndjson_nested_too_deep_is_rejected(
    store: NodeStore, tmp_path: Path
) -> None:
    source = tmp_path / "bundles.ndjson"
    source.write_bytes(deep_bundle(300) + b"\n" + line(patient("p3")))

    report = ingest_files(store, [source])

    assert report.types["Patient"].stored == 1
    assert report.total("rejected") == 1


# -- size ---------------------------------------------------------------------------------


def test_an_ndjson_line_over_the_size_bound_is_rejected_and_the_rest_is_stored(
    store: NodeStore, tmp_path: Path
) -> None:
    big = {**patient("big"), "pad": "x" * 5000}
    source = tmp_path / "big.ndjson"
    source.write_bytes(line(patient("p1")) + line(big) + line(patient("p2")))

    report = ingest_files(store, [source], limits=IngestLimits(max_resource_bytes=1000))

    assert report.types["Patient"].stored == 2
    assert report.total("rejected") == 1
    assert any("larger than 1000 bytes" in reason for reason in rejected(report))


def test_a_gzip_bomb_line_is_rejected_and_the_lines_around_it_are_stored(
    store: NodeStore, tmp_path: Path
) -> None:
    source = gzip_bomb(tmp_path / "bomb.ndjson.gz", expanded_mib=32)
    assert source.stat().st_size < 1 << 20

    report = ingest_files(store, [source], limits=IngestLimits(max_resource_bytes=1 << 20))

    assert report.types["Patient"].stored == 2
    assert report.total("rejected") == 1
    assert any("larger than 1048576 bytes" in reason for reason in rejected(report))


def test_a_bundle_entry_over_the_size_bound_is_rejected_and_the_others_are_stored(
    store: NodeStore, tmp_path: Path
) -> None:
    entries = [patient("p1"), {**patient("big"), "pad": "x" * 5000}, patient("p2")]
    bundle = {"resourceType": "Bundle", "entry": [{"resource": r} for r in entries]}
    source = tmp_path / "bundle.json"
    source.write_text(json.dumps(bundle), encoding="utf-8")

    report = ingest_files(store, [source], limits=IngestLimits(max_resource_bytes=1000))

    assert report.types["Patient"].stored == 2
    assert report.total("rejected") == 1


def test_a_huge_string_in_a_bundle_stops_that_file_without_reading_it_into_memory(
    store: NodeStore, tmp_path: Path
) -> None:
    head = b'{"resourceType":"Bundle","entry":[{"resource":' + line(patient("p1")) + b"},"
    body = b'{"resource":{"resourceType":"Patient","id":"big","pad":"' + b"x" * (4 << 20)
    source = tmp_path / "huge.json"
    source.write_bytes(head + body + b'"}}]}')

    report = ingest_files(store, [source], limits=IngestLimits(max_resource_bytes=1 << 16))

    assert report.types["Patient"].stored == 1
    assert report.total("rejected") >= 1


def test_a_single_resource_file_over_the_size_bound_is_rejected(
    store: NodeStore, tmp_path: Path
) -> None:
    (tmp_path / "one.json").write_text(json.dumps({**patient("big"), "pad": "x" * 5000}))
    (tmp_path / "two.json").write_text(json.dumps(patient("p2")))

    report = ingest_files(store, [tmp_path], limits=IngestLimits(max_resource_bytes=1000))

    assert report.types["Patient"].stored == 1
    assert report.total("rejected") == 1


def test_peak_memory_of_an_ingest_of_hostile_files_stays_flat(tmp_path: Path) -> None:
    """Files that drove the old ingest to 6 GB (a 100 KB Bundle nested 50k deep) and 2.6 GB (a
    512 MiB line from a gzip of 0.5 MB) are ingested by the real CLI in under 1 GB."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "deep.json").write_bytes(deep_bundle(50_000))
    gzip_bomb(data / "bomb.ndjson.gz", expanded_mib=512)
    (data / "deep.ndjson").write_bytes(deep_patient("deep", 100_000) + b"\n" + line(patient("x")))
    home = tmp_path / "node"
    command = [sys.executable, "-m", "aipipe", "node"]
    subprocess.run([*command, "init", "--home", str(home), "--name", "n1"], check=True)
    probe = (
        "import resource, subprocess, sys; "
        "code = subprocess.call(sys.argv[1:], stdout=subprocess.DEVNULL); "
        "print(code, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    ingest = [*command, "ingest", "--home", str(home), "--json", str(data)]

    result = subprocess.run(
        [sys.executable, "-c", probe, *ingest], capture_output=True, text=True, check=True
    )

    code, peak_kib = map(int, result.stdout.split())
    assert code == 0, result.stderr
    assert peak_kib < 1024 * 1024, f"peak RSS {peak_kib / 1024:.0f} MiB"
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss < 4 * 1024 * 1024


# -- server pages -------------------------------------------------------------------------


def server(body: bytes) -> FhirServerSource:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers={"Content-Type": "application/fhir+json"})

    return FhirServerSource(
        base_url="https://ehr.example.org/fhir",
        transport=httpx.MockTransport(handler),
        max_retries=0,
        limits=IngestLimits(max_resource_bytes=1000),
    )


def test_a_server_page_over_the_size_bound_is_refused_with_a_clear_error() -> None:
    page = {"resourceType": "Bundle", "entry": [{"resource": patient(f"p{i}")} for i in range(99)]}
    body = json.dumps(page).encode()
    assert len(body) > 5000

    with server(body) as source, pytest.raises(FhirServerError, match="page-size"):
        list(source.iter_resources("Patient"))


def test_a_server_page_nested_too_deep_is_refused_without_a_recursion_error() -> None:
    body = b'{"resourceType":"Bundle","entry":[{"resource":' + deep_patient("d", 400) + b"}]}"

    with server(body) as source, pytest.raises(FhirServerError, match="nested deeper"):
        list(source.iter_resources("Patient"))


def test_a_server_resource_over_the_size_bound_is_counted_as_rejected(store: NodeStore) -> None:
    class Source:
        def iter_resources(self, resource_type: str, since: str | None) -> Any:
            yield patient("p1")
            yield {**patient("big"), "pad": "x" * 5000}

    report = ingest_server(
        store,
        Source(),
        source_key="s",
        resource_types=["Patient"],
        limits=IngestLimits(max_resource_bytes=1000),
    )

    assert (report.types["Patient"].stored, report.types["Patient"].rejected) == (1, 1)


# -- item 17: no resource content in reports ----------------------------------------------


def hostile_files(folder: Path) -> Path:
    folder.mkdir()
    name = FAKE_NAME.encode()
    bad_utf8 = b'{"resourceType":"Bundle","entry":[{"resource":{"resourceType":"Patient",'
    bad_utf8 += b'"id":"p9","name":[{"text":"' + name + b'\xff"}]}}]}'
    (folder / "a.json").write_bytes(bad_utf8)
    bad_token = b'{"resourceType":"Bundle","entry":[{"resource":{"name":"' + name + b'" oops}}]}'
    (folder / "b.json").write_bytes(bad_token)
    (folder / "c.ndjson").write_bytes(
        b'{"resourceType":"Patient","name":"'
        + name
        + b'" ,}\n'
        + line({"resourceType": FAKE_NAME, "id": "x"})
        + line({"resourceType": FAKE_NAME})
        + line(patient("ok"))
    )
    return folder


@pytest.mark.parametrize("as_json", [False, True])
def test_reports_of_unparseable_resources_never_quote_their_content(
    tmp_path: Path, as_json: bool
) -> None:
    runner = CliRunner()
    home = tmp_path / "node"
    assert runner.invoke(app, ["node", "init", "--home", str(home), "--name", "n1"]).exit_code == 0
    data = hostile_files(tmp_path / "data")
    args = ["node", "ingest", "--home", str(home), str(data)] + (["--json"] if as_json else [])

    result = runner.invoke(app, args)

    assert result.exit_code == 0, result.output
    assert "rejected" in result.stdout
    assert FAKE_NAME not in result.stdout + result.stderr
    assert "Zebediah" not in result.stdout + result.stderr
    with sqlite3.connect(home / "store.sqlite") as conn:
        reports = [row[0] for row in conn.execute("SELECT report FROM ingest_runs")]
    assert reports and all("Zebediah" not in report for report in reports)
    audit = (home / "audit.sqlite").read_bytes()
    assert b"Zebediah" not in audit
