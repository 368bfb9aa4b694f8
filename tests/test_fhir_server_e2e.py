"""Pull a Synthea patient from a real FHIR R4 server (sekmet-fhir) with paging and cursors.

The module starts its own empty server (not the shared session one) so that what the server
holds is exactly the one bundle loaded here, and counts can be compared one for one.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from aipipe.fhir.server import DEFAULT_TYPES, FhirServerSource
from tests.fhir_server import FhirTestServer, start_fhir_server

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
SYNTHEA = REPO.parent / "shared" / "data" / "synthea_fhir_r4"
PAGE_SIZE = 7


@dataclass
class Loaded:
    server: FhirTestServer
    ids: dict[str, set[str]]  # the ids the server gave each created resource, by type

    def count(self, resource_type: str) -> int:
        return len(self.ids.get(resource_type, set()))


def smallest_bundle() -> Path:
    manifest = SYNTHEA / "manifest.csv"
    if not manifest.exists():
        pytest.skip(f"Synthea data not found at {SYNTHEA}")
    with manifest.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return SYNTHEA / min(rows, key=lambda row: int(row["size_bytes"]))["file"]


def created_ids(response: dict[str, Any]) -> dict[str, set[str]]:
    """Type → ids from a transaction-response's `Type/id/_history/n` locations."""
    ids: dict[str, set[str]] = {}
    for entry in response["entry"]:
        assert entry["response"]["status"].startswith("201"), entry["response"]
        rtype, rid = entry["response"]["location"].split("/")[-4:-2]
        ids.setdefault(rtype, set()).add(rid)
    return ids


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loaded]:
    bundle = json.loads(smallest_bundle().read_bytes())
    with start_fhir_server(tmp_path_factory.mktemp("sekmet-e2e")) as server:
        response = server.post_bundle(bundle)
        ids = created_ids(response)
        in_bundle = Counter(e["resource"]["resourceType"] for e in bundle["entry"])
        assert {t: len(i) for t, i in ids.items()} == dict(in_bundle)
        yield Loaded(server, ids)


def source_for(loaded: Loaded) -> FhirServerSource:
    return FhirServerSource(base_url=loaded.server.base_url, page_size=PAGE_SIZE, max_retries=1)


def bump(loaded: Loaded, resource: dict[str, Any]) -> dict[str, Any]:
    """PUT a changed copy of `resource`, as an EHR amending a result would."""
    changed = copy.deepcopy(resource)
    changed["status"] = "amended"
    changed.pop("meta", None)
    return loaded.server.put(changed)


def test_server_is_fhir_r4(loaded: Loaded) -> None:
    with source_for(loaded) as source:
        assert source.capabilities()["fhirVersion"].startswith("4.0.")


@pytest.mark.parametrize("resource_type", DEFAULT_TYPES)
def test_pull_pages_through_every_resource_of_the_bundle(
    loaded: Loaded, resource_type: str
) -> None:
    with source_for(loaded) as source:
        pulled = [r["id"] for r in source.iter_resources(resource_type)]

    assert sorted(pulled) == sorted(loaded.ids.get(resource_type, set()))
    assert source.last_pull is not None
    assert source.last_pull.pages == max(1, math.ceil(len(pulled) / PAGE_SIZE))
    assert source.last_pull.total == len(pulled)
    assert source.last_pull.outcomes == 0  # every search parameter was understood


def test_observations_span_several_pages(loaded: Loaded) -> None:
    assert loaded.count("Observation") > 3 * PAGE_SIZE


def test_last_updated_cursor_returns_only_what_changed_since(loaded: Loaded) -> None:
    with source_for(loaded) as source:
        first = list(source.iter_resources("Observation"))
        cursor = max(r["meta"]["lastUpdated"] for r in first)
        stored = bump(loaded, first[len(first) // 2])

        second = list(source.iter_resources("Observation", since=cursor))

    assert [(r["id"], r["meta"]["versionId"]) for r in second] == [(stored["id"], "2")]
    assert second[0]["status"] == "amended"
    assert second[0]["meta"]["lastUpdated"] > cursor


def aipipe(*args: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "aipipe", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, f"aipipe {' '.join(args)} exited {done.returncode}: {done.stderr}"
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_cli_ingest_from_fhir_server(loaded: Loaded, tmp_path: Path) -> None:
    home = str(tmp_path / "node")
    url = loaded.server.base_url
    expected = {t: loaded.count(t) for t in DEFAULT_TYPES if loaded.count(t)}
    aipipe("node", "init", "--home", home, "--name", "n1", "--json")

    first = aipipe(
        "node", "ingest", "--home", home, "--fhir-url", url, "--page-size", "7", "--json"
    )
    status = aipipe("node", "status", "--home", home, "--json")

    assert {t: c["stored"] for t, c in first["types"].items() if c["stored"]} == expected
    assert first["totals"]["rejected"] == 0
    assert status["resources"] == expected
    assert status["patients"] == 1
    assert {c["resource_type"] for c in status["cursors"]} == set(expected)

    with source_for(loaded) as source:
        observation = next(iter(source.iter_resources("Observation")))
    bump(loaded, observation)
    second = aipipe(
        "node", "ingest", "--home", home, "--fhir-url", url, "--page-size", "7", "--json"
    )

    assert second["types"]["Observation"]["updated"] == 1
    assert (second["totals"]["read"], second["totals"]["updated"]) == (1, 1)
