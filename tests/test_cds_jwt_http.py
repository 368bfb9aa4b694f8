"""CDS Client JWTs over HTTP: 401 without, with a replayed or an expired token; discovery and
feedback checked against their own URL (the policy's own checks: tests/test_cds_auth.py)."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from aipipe.audit import AuditLog
from aipipe.cds import (
    JwtPolicy,
    PatientScorer,
)
from tests.cds_support import (
    BASE,
    ISSUER,
    SERVICE,
    Fhir,
    Signer,
    events,
    hook_request,
    make_client,
    post,
    prefetch_for,
)

# -- JWT over HTTP (the policy's own checks: test_cds_auth.py) -------------------------------------


@pytest.fixture
def secured(
    scorer: PatientScorer, audit: AuditLog, fhir: Fhir, es384: Signer, rs384: Signer
) -> TestClient:
    policy = JwtPolicy({ISSUER: {"keys": [es384.jwk, rs384.jwk]}}, base_url=BASE)
    return make_client(scorer, audit, fhir, policy)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def call(
    client: TestClient, records: dict[str, list[dict[str, Any]]], token: str | None
) -> httpx.Response:
    headers = bearer(token) if token is not None else {}
    return post(client, hook_request(prefetch=prefetch_for(records)), headers=headers)


def test_a_call_without_a_jwt_is_401_and_audited(
    secured: TestClient, audit: AuditLog, records: dict[str, list[dict[str, Any]]]
) -> None:
    response = call(secured, records, None)

    assert response.status_code == 401
    assert response.json()["resourceType"] == "OperationOutcome"
    (event,) = events(audit, "auth.failure")
    assert event.outcome == "refused"


@pytest.mark.parametrize("signer", ["es384", "rs384"])
def test_a_valid_jwt_is_accepted(
    secured: TestClient,
    audit: AuditLog,
    records: dict[str, list[dict[str, Any]]],
    signer: str,
    request: pytest.FixtureRequest,
) -> None:
    token = request.getfixturevalue(signer).token()

    response = call(secured, records, token)

    assert response.status_code == 200
    event = events(audit, "cds.request")[-1]
    assert (event.actor, event.details["tenant"]) == (f"cds-client:{ISSUER}", "st-olav")


def test_a_replayed_jwt_is_401(
    secured: TestClient, es384: Signer, records: dict[str, list[dict[str, Any]]]
) -> None:
    token = es384.token()

    first, second = call(secured, records, token), call(secured, records, token)

    assert first.status_code == 200
    assert second.status_code == 401
    assert "replayed" in second.json()["issue"][0]["diagnostics"]


def test_an_expired_jwt_is_401(
    secured: TestClient, es384: Signer, records: dict[str, list[dict[str, Any]]]
) -> None:
    now = int(time.time())

    response = call(secured, records, es384.token(iat=now - 180, exp=now - 120))

    assert response.status_code == 401
    assert "expired" in response.json()["issue"][0]["diagnostics"]


def test_discovery_and_feedback_need_a_jwt_for_their_own_url(
    secured: TestClient, es384: Signer
) -> None:
    assert secured.get("/cds-services").status_code == 401
    ok = secured.get("/cds-services", headers=bearer(es384.token(endpoint="/cds-services")))
    assert ok.status_code == 200
    feedback = {
        "feedback": [
            {"card": "c", "outcome": "overridden", "outcomeTimestamp": "2024-05-01T10:00:00Z"}
        ]
    }
    url = f"/cds-services/{SERVICE}/feedback"
    assert secured.post(url, json=feedback, headers=bearer(es384.token())).status_code == 401
    token = es384.token(endpoint=f"/cds-services/{SERVICE}/feedback")
    assert secured.post(url, json=feedback, headers=bearer(token)).status_code == 200


def test_without_a_base_url_the_audience_is_the_url_called(
    scorer: PatientScorer, fhir: Fhir, es384: Signer, records: dict[str, list[dict[str, Any]]]
) -> None:
    client = make_client(scorer, None, fhir, JwtPolicy({ISSUER: {"keys": [es384.jwk]}}))
    token = es384.token(aud=f"http://testserver/cds-services/{SERVICE}")

    assert call(client, records, token).status_code == 200
