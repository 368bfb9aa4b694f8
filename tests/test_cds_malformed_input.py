"""Malformed input to the CDS service gets an answer, never a 500: prefetch that is there but
unusable (an info card naming what is wrong), and bad requests (400/404/413 with an
OperationOutcome)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.cds_support import (
    FHIR,
    PID,
    SERVICE,
    hook_request,
    post,
    prefetch_for,
    the_card,
)

# -- prefetch that is there but unusable -------------------------------------------------------


def test_null_observations_give_an_info_card_naming_what_is_missing(
    client: TestClient, records: dict[str, list[dict[str, Any]]]
) -> None:
    prefetch = prefetch_for(records) | {"observations": None}

    card = the_card(post(client, hook_request(prefetch=prefetch)))

    assert card["indicator"] == "info"
    assert card["summary"].startswith("Coronary artery disease risk not scored: missing age")
    assert "no Observation coded LOINC 2093-3" in card["detail"]


def test_a_prefetched_patient_of_the_wrong_type_gives_an_info_card(
    client: TestClient, records: dict[str, list[dict[str, Any]]]
) -> None:
    prefetch = prefetch_for(records)
    prefetch["patient"] = prefetch["observations"]["entry"][0]["resource"]

    card = the_card(post(client, hook_request(prefetch=prefetch)))

    assert card["indicator"] == "info"
    assert "prefetch 'patient' holds a Observation, not a Patient" in card["detail"]


def test_a_prefetched_patient_other_than_the_context_patient_gives_an_info_card(
    client: TestClient, records: dict[str, list[dict[str, Any]]]
) -> None:
    prefetch = prefetch_for(records) | {
        "patient": prefetch_for(records, "cleveland-0001")["patient"]
    }

    card = the_card(post(client, hook_request(prefetch=prefetch)))

    assert card["indicator"] == "info"
    assert "different patient" in card["detail"]


def test_entries_of_another_patient_are_skipped_and_noted(
    client: TestClient, records: dict[str, list[dict[str, Any]]]
) -> None:
    prefetch = prefetch_for(records)
    foreign = prefetch_for(records, "cleveland-0001")["observations"]["entry"][0]
    prefetch["observations"]["entry"].append(foreign)

    card = the_card(post(client, hook_request(prefetch=prefetch)))

    assert card["suggestions"]
    assert "1 entry of prefetch 'observations' skipped: another patient" in card["detail"]


def test_a_paged_prefetch_is_scored_with_a_note_that_pages_were_not_read(
    client: TestClient, records: dict[str, list[dict[str, Any]]]
) -> None:
    prefetch = prefetch_for(records)
    prefetch["observations"]["link"] = [{"relation": "next", "url": f"{FHIR}/Observation?page=2"}]

    card = the_card(post(client, hook_request(prefetch=prefetch)))

    assert card["suggestions"]
    assert "prefetch 'observations' holds one page of a longer result" in card["detail"]


GARBAGE = [
    {"observations": "a string"},
    {"observations": 42},
    {"observations": []},
    {"observations": {"resourceType": "Bundle", "entry": "x"}},
    {"observations": {"resourceType": "Bundle", "entry": [1, "x", None, {"resource": 5}]}},
    {
        "observations": {
            "resourceType": "Bundle",
            "entry": [{"resource": {"resourceType": "Observation"}}],
        }
    },
    {"patient": {"resourceType": "Patient"}},
    {"patient": {"resourceType": "Patient", "id": PID, "birthDate": 1921}},
    {
        "patient": {
            "resourceType": "Bundle",
            "entry": [{"resource": {"resourceType": "Patient", "id": PID}}],
        }
    },
    {
        "conditions": {
            "resourceType": "Bundle",
            "entry": [
                {
                    "resource": {
                        "resourceType": "Condition",
                        "subject": {"reference": f"Patient/{PID}"},
                        "code": 7,
                    }
                }
            ],
        }
    },
    {"patient": None},
]


@pytest.mark.parametrize("damage", GARBAGE)
def test_malformed_prefetch_values_get_an_answer_never_a_500(
    client: TestClient, records: dict[str, list[dict[str, Any]]], damage: dict[str, Any]
) -> None:
    prefetch = prefetch_for(records) | damage

    response = post(client, hook_request(prefetch=prefetch))

    assert response.status_code == 200, response.text
    assert all(card["summary"] for card in response.json()["cards"])


def test_unusable_observations_inside_a_good_bundle_are_reported(
    client: TestClient, records: dict[str, list[dict[str, Any]]]
) -> None:
    prefetch = prefetch_for(records)
    chol = next(
        e for e in prefetch["observations"]["entry"] if e["resource"]["id"].endswith("chol")
    )
    chol["resource"] = chol["resource"] | {"valueQuantity": {"value": "high"}}

    card = the_card(post(client, hook_request(prefetch=prefetch)))

    assert card["indicator"] == "info"
    assert "Observation.valueQuantity.value is not a number" in card["detail"]


# -- bad requests: 400/404/413, never 500 ------------------------------------------------------


BAD_REQUESTS: list[tuple[str, Any, int, str]] = [
    ("not JSON", b"{nope", 400, "not valid JSON"),
    ("a JSON array", b"[]", 400, "CdsRequest"),
    ("no hook", {"hookInstance": "x", "context": {"patientId": PID}}, 400, "hook"),
    ("no context", {"hook": "patient-view", "hookInstance": "x"}, 400, "context"),
    (
        "no patientId",
        {"hook": "patient-view", "hookInstance": "x", "context": {}},
        400,
        "patientId",
    ),
    (
        "a patientId that is not a string",
        {"hook": "patient-view", "hookInstance": "x", "context": {"patientId": 5}},
        400,
        "patientId",
    ),
    (
        "a patientId that is not a FHIR id",
        {"hook": "patient-view", "hookInstance": "x", "context": {"patientId": "a/b"}},
        400,
        "patientId",
    ),
    (
        "the wrong hook",
        {"hook": "order-sign", "hookInstance": "x", "context": {"patientId": PID}},
        400,
        "answers the patient-view hook, not 'order-sign'",
    ),
    (
        "an unknown field",
        {"hook": "patient-view", "hookInstance": "x", "context": {"patientId": PID}, "surprise": 1},
        400,
        "surprise",
    ),
    (
        "fhirAuthorization without fhirServer",
        {
            "hook": "patient-view",
            "hookInstance": "x",
            "context": {"patientId": PID},
            "fhirAuthorization": {
                "access_token": "t",
                "token_type": "Bearer",
                "expires_in": 1,
                "scope": "s",
                "subject": "c",
            },
        },
        400,
        "fhirServer",
    ),
    (
        "a prefetch that is not an object",
        {
            "hook": "patient-view",
            "hookInstance": "x",
            "context": {"patientId": PID},
            "prefetch": "p",
        },
        400,
        "prefetch",
    ),
]


@pytest.mark.parametrize(
    ("body", "status", "diagnostics"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
def test_a_bad_request_is_a_4xx_with_an_operation_outcome(
    client: TestClient, body: Any, status: int, diagnostics: str
) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()

    response = client.post(
        f"/cds-services/{SERVICE}", content=content, headers={"content-type": "application/json"}
    )

    assert response.status_code == status, response.text
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert diagnostics in outcome["issue"][0]["diagnostics"]


def test_an_unknown_service_is_404(client: TestClient) -> None:
    response = post(client, hook_request(), service="no-such-service")

    assert response.status_code == 404
    assert "GET /cds-services" in response.json()["issue"][0]["diagnostics"]


def test_an_oversized_body_is_413(client: TestClient) -> None:
    response = client.post(
        f"/cds-services/{SERVICE}",
        content=b" " * (16 * 1024 * 1024 + 1),
        headers={"content-type": "application/json"},
    )

    assert response.status_code == 413
