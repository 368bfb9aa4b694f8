"""What the CDS service writes down: each call audited under a pseudonym (never the patient id),
refusals audited as failures, and card feedback stored in the audit log."""

from __future__ import annotations

import sqlite3
from typing import Any

import pytest
from fastapi.testclient import TestClient

from aipipe.audit import AuditLog
from tests.cds_support import (
    PID,
    SERVICE,
    VERSION,
    events,
    hook_request,
    post,
    prefetch_for,
    the_card,
)

# -- audit --------------------------------------------------------------------------------------


def test_a_call_is_audited_with_a_pseudonym_never_the_patient_id(
    client: TestClient, audit: AuditLog, records: dict[str, list[dict[str, Any]]]
) -> None:
    the_card(post(client, hook_request(prefetch=prefetch_for(records))))

    (event,) = events(audit, "cds.request")
    assert event.resource.startswith("patient:") and PID not in event.resource
    assert event.details["model_version"] == VERSION
    assert event.details["scored"] is True
    dump = "\n".join(
        str(row) for row in sqlite3.connect(audit.path).execute("SELECT * FROM events")
    )
    assert PID not in dump and "cleveland" not in dump


def test_the_same_patient_has_the_same_pseudonym_across_calls(
    client: TestClient, audit: AuditLog, records: dict[str, list[dict[str, Any]]]
) -> None:
    for _ in range(2):
        post(client, hook_request(prefetch=prefetch_for(records)))
    post(
        client, hook_request(pid="cleveland-0001", prefetch=prefetch_for(records, "cleveland-0001"))
    )

    first, second, other = (e.resource for e in events(audit, "cds.request"))
    assert first == second != other


def test_a_refused_call_is_audited_as_a_failure(client: TestClient, audit: AuditLog) -> None:
    post(client, hook_request())

    (event,) = events(audit, "cds.request")
    assert (event.outcome, event.details["status"]) == ("failure", 412)


# -- feedback -----------------------------------------------------------------------------------


def test_feedback_is_stored_in_the_audit_log_and_answered_200(
    client: TestClient, audit: AuditLog, records: dict[str, list[dict[str, Any]]]
) -> None:
    card = the_card(post(client, hook_request(prefetch=prefetch_for(records))))
    feedback = {
        "feedback": [
            {
                "card": card["uuid"],
                "outcome": "accepted",
                "acceptedSuggestions": [{"id": card["suggestions"][0]["uuid"]}],
                "outcomeTimestamp": "2024-05-01T10:05:31Z",
            },
            {
                "card": card["uuid"],
                "outcome": "overridden",
                "overrideReason": {
                    "reason": {"code": "d7ecf885", "system": "https://example.com/reasons"},
                    "userComment": "Mr Smith declined, see note",
                },
                "outcomeTimestamp": "2024-05-01T10:06:00Z",
            },
        ]
    }

    response = client.post(f"/cds-services/{SERVICE}/feedback", json=feedback)

    assert response.status_code == 200
    accepted, overridden = (e.details for e in events(audit, "cds.feedback"))
    assert accepted["card"] == card["uuid"]
    assert accepted["acceptedSuggestions"] == [card["suggestions"][0]["uuid"]]
    assert overridden["overrideReason"] == {
        "system": "https://example.com/reasons",
        "code": "d7ecf885",
    }
    assert overridden["userComment"] is True
    dump = "\n".join(
        str(row) for row in sqlite3.connect(audit.path).execute("SELECT * FROM events")
    )
    assert "Smith" not in dump


@pytest.mark.parametrize(
    "feedback",
    [
        {"feedback": []},
        {
            "feedback": [
                {"card": "c", "outcome": "accepted", "outcomeTimestamp": "2024-05-01T10:00:00Z"}
            ]
        },
        {
            "feedback": [
                {"card": "c", "outcome": "liked", "outcomeTimestamp": "2024-05-01T10:00:00Z"}
            ]
        },
        {"feedback": [{"card": "c", "outcome": "overridden", "outcomeTimestamp": "yesterday"}]},
    ],
)
def test_malformed_feedback_is_400(client: TestClient, feedback: dict[str, Any]) -> None:
    response = client.post(f"/cds-services/{SERVICE}/feedback", json=feedback)

    assert response.status_code == 400
    assert response.json()["resourceType"] == "OperationOutcome"


def test_feedback_for_an_unknown_service_is_404(client: TestClient) -> None:
    response = client.post("/cds-services/nope/feedback", json={"feedback": []})

    assert response.status_code == 404
