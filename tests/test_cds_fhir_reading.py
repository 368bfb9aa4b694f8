"""How the CDS service reads what prefetch left out: 412 without a usable fhirServer, reading with
the token, paging (and its budget), failing and off-allow-list FHIR servers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from aipipe.audit import AuditLog
from aipipe.cds import (
    FhirAccess,
    PatientScorer,
)
from tests.cds_support import (
    FHIR,
    PID,
    Fhir,
    events,
    hook_request,
    make_client,
    post,
    prefetch_for,
    searchset,
    the_card,
)

# -- 412 and the fhirServer path -------------------------------------------------------------


def test_no_prefetch_and_no_fhir_server_is_412(client: TestClient) -> None:
    response = post(client, hook_request())

    assert response.status_code == 412
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert "patient, observations" in outcome["issue"][0]["diagnostics"]


def test_a_required_prefetch_key_left_out_without_fhir_server_is_412(
    client: TestClient, records: dict[str, list[dict[str, Any]]]
) -> None:
    prefetch = prefetch_for(records)
    del prefetch["observations"]

    response = post(client, hook_request(prefetch=prefetch))

    assert response.status_code == 412
    assert "observations" in response.json()["issue"][0]["diagnostics"]


def test_an_optional_key_left_out_still_scores(
    client: TestClient, records: dict[str, list[dict[str, Any]]]
) -> None:
    prefetch = prefetch_for(records)
    del prefetch["conditions"]

    card = the_card(post(client, hook_request(prefetch=prefetch)))

    assert card["suggestions"]


def test_without_prefetch_the_service_reads_the_fhir_server_with_the_token(
    client: TestClient, fhir: Fhir, audit: AuditLog
) -> None:
    body = hook_request(
        fhirServer=FHIR,
        fhirAuthorization={
            "access_token": "opaque-token",
            "token_type": "Bearer",
            "expires_in": 300,
            "scope": "user/Patient.read user/Observation.read",
            "subject": "aipipe-cds",
        },
    )

    card = the_card(post(client, body))

    assert card["suggestions"]
    assert {r.headers["authorization"] for r in fhir.requests} == {"Bearer opaque-token"}
    paths = sorted(r.url.path for r in fhir.requests)
    assert paths == ["/fhir/Condition", "/fhir/Observation", f"/fhir/Patient/{PID}"]
    assert events(audit, "cds.request")[-1].details["data"] == "fhirServer"


def test_only_the_keys_the_client_left_out_are_fetched(
    client: TestClient, fhir: Fhir, records: dict[str, list[dict[str, Any]]]
) -> None:
    prefetch = prefetch_for(records)
    del prefetch["observations"]

    the_card(post(client, hook_request(prefetch=prefetch, fhirServer=FHIR)))

    assert [r.url.path for r in fhir.requests] == ["/fhir/Observation"]


def test_a_prefetch_operation_outcome_counts_as_not_satisfied(
    client: TestClient, fhir: Fhir, records: dict[str, list[dict[str, Any]]]
) -> None:
    prefetch = prefetch_for(records)
    prefetch["observations"] = {"resourceType": "OperationOutcome", "issue": []}

    the_card(post(client, hook_request(prefetch=prefetch, fhirServer=FHIR)))

    assert [r.url.path for r in fhir.requests] == ["/fhir/Observation"]


def test_search_pages_are_followed(client: TestClient, fhir: Fhir) -> None:
    fhir.page_size = 4  # the study reads 9 of the patient's Observations: 3 pages

    card = the_card(post(client, hook_request(fhirServer=FHIR)))

    assert card["suggestions"]
    assert len([r for r in fhir.requests if r.url.path == "/fhir/Observation"]) == 3
    assert len(card["suggestions"][0]["actions"][0]["resource"]["basis"]) == 1 + 9


def older_copies(records: dict[str, list[dict[str, Any]]], pid: str = PID) -> list[str]:
    """Put a year-older copy of each of the patient's Observations after the originals (a
    newest-first searchset, as `_sort=-date` asks); return the originals' ids."""
    observations = [r for r in records[pid] if r["resourceType"] == "Observation"]
    for resource in observations:
        old = json.loads(json.dumps(resource))
        old["id"] += "-old"
        old["effectiveDateTime"] = str(int(resource["effectiveDateTime"][:4]) - 1) + "-01-01"
        records[pid].append(old)
    return [f"Observation/{r['id']}" for r in observations]


def test_paging_stops_once_every_latest_input_has_its_newest_value(
    client: TestClient, fhir: Fhir, records: dict[str, list[dict[str, Any]]]
) -> None:
    fhir.records = {pid: list(mine) for pid, mine in records.items()}  # the fixture's stay as is
    newest = older_copies(fhir.records)
    fhir.page_size = 4  # 18 matching Observations: 5 pages; the 9 newest are on the first 3

    card = the_card(post(client, hook_request(fhirServer=FHIR)))

    searches = [r for r in fhir.requests if r.url.path == "/fhir/Observation"]
    assert len(searches) == 3
    assert dict(searches[0].url.params)["_sort"] == "-date"
    basis = {b["reference"] for b in card["suggestions"][0]["actions"][0]["resource"]["basis"]}
    assert len(basis) == 1 + 9 and basis <= {f"Patient/{PID}", *newest}  # no older copy


def test_a_search_cut_short_by_the_budget_is_412_when_inputs_may_be_unread(
    scorer: PatientScorer, fhir: Fhir
) -> None:
    fhir.page_size = 4
    access = FhirAccess(transport=httpx.MockTransport(fhir), allowed_servers=(FHIR,), budget_s=0.0)

    response = post(make_client(scorer, None, fhir, access=access), hook_request(fhirServer=FHIR))

    assert response.status_code == 412
    diagnostics = response.json()["issue"][0]["diagnostics"]
    assert "'observations' search was cut short" in diagnostics and "reading budget" in diagnostics
    assert len([r for r in fhir.requests if r.url.path == "/fhir/Observation"]) == 1


@pytest.mark.parametrize(
    ("failure", "diagnostics"),
    [
        (lambda r: httpx.Response(500), "answered 500"),
        (lambda r: httpx.Response(401), "answered 401"),
        (lambda r: httpx.Response(200, text="<html>"), "not JSON"),
        (lambda r: httpx.Response(404) if "Observation" in r.url.path else None, "answered 404"),
    ],
)
def test_a_failing_fhir_server_is_412(
    client: TestClient,
    fhir: Fhir,
    failure: Callable[[httpx.Request], httpx.Response],
    diagnostics: str,
) -> None:
    fhir.fail = failure

    response = post(client, hook_request(fhirServer=FHIR))

    assert response.status_code == 412
    assert diagnostics in response.json()["issue"][0]["diagnostics"]


@pytest.mark.parametrize(
    ("error", "diagnostics"),
    [(httpx.ConnectError, "cannot be reached"), (httpx.ReadTimeout, "in time")],
)
def test_an_unreachable_fhir_server_is_412(
    client: TestClient, fhir: Fhir, error: type[httpx.TransportError], diagnostics: str
) -> None:
    def unreachable(request: httpx.Request) -> httpx.Response:
        raise error("down", request=request)

    fhir.fail = unreachable

    response = post(client, hook_request(fhirServer=FHIR))

    assert response.status_code == 412
    assert diagnostics in response.json()["issue"][0]["diagnostics"]


def test_a_plain_http_fhir_server_is_not_called(client: TestClient, fhir: Fhir) -> None:
    response = post(client, hook_request(fhirServer="http://ehr.example.org/fhir"))

    assert response.status_code == 412
    assert "https" in response.json()["issue"][0]["diagnostics"]
    assert fhir.requests == []


def test_a_patient_the_fhir_server_does_not_know_gets_an_info_card(client: TestClient) -> None:
    card = the_card(post(client, hook_request(pid="nobody", fhirServer=FHIR)))

    assert card["indicator"] == "info"
    assert "no Patient resource" in card["detail"]


# -- the allow-list ------------------------------------------------------------------------------


def test_a_fhir_server_off_the_allow_list_is_not_called(fhir: Fhir) -> None:
    access = FhirAccess(
        transport=httpx.MockTransport(fhir), allowed_servers=("https://other.org/fhir",)
    )

    result = asyncio.run(access.fetch(FHIR, "t", {"patient": f"Patient/{PID}"}))

    assert "allow-list" in result.errors["patient"]
    assert fhir.requests == []


def test_a_paging_link_to_another_server_is_not_followed(fhir: Fhir) -> None:
    def elsewhere(request: httpx.Request) -> httpx.Response | None:
        if request.url.path == "/fhir/Observation":
            bundle = searchset([]) | {
                "link": [{"relation": "next", "url": "https://evil.example/x"}]
            }
            return httpx.Response(200, json=bundle)
        return None

    fhir.fail = elsewhere
    access = FhirAccess(transport=httpx.MockTransport(fhir), allowed_servers=(FHIR,))

    result = asyncio.run(access.fetch(FHIR, None, {"observations": f"Observation?patient={PID}"}))

    assert "another server" in result.errors["observations"]
    assert all(r.url.host == "ehr.example.org" for r in fhir.requests)
