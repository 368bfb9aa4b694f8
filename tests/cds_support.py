"""Helpers the CDS tests share: the Cleveland patients as prefetch and hook requests, a FHIR
server behind httpx.MockTransport, an in-process CDS app, and a CDS Client's JWT signer.

Fixtures built from these (the trained scorer, the records, the mock FHIR server, the audit log,
the client, the signers) are in tests/conftest.py.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from fastapi import FastAPI
from fastapi.testclient import TestClient

from aipipe.audit import AuditLog
from aipipe.cds import (
    CdsSettings,
    FhirAccess,
    JwtPolicy,
    PatientScorer,
    StaticCdsProvider,
    cds_router,
    render_template,
)

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CLEVELAND = ROOT / "examples" / "heart-disease" / "fhir" / "cleveland"
KEY = b"cds-test-pseudonym-key-32-bytes!"
VERSION = "c0ffee" * 10 + "abcd"
SERVICE = "fed-heart-disease-patient-view"
PID = "cleveland-0002"
FHIR = "https://ehr.example.org/fhir"


# -- a model and the data of its patients -----------------------------------------------------


def read_ndjson(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# -- the data of the patients, as a CDS Client sends it ---------------------------------------


def cleveland_records() -> dict[str, list[dict[str, Any]]]:
    """The Cleveland patients' resources (Patient, Observation, Condition) by patient id."""
    by_patient: dict[str, list[dict[str, Any]]] = {}
    for name in ("Patient", "Observation", "Condition"):
        for resource in read_ndjson(CLEVELAND / f"{name}.ndjson"):
            ref = resource["id"] if name == "Patient" else resource["subject"]["reference"]
            by_patient.setdefault(ref.removeprefix("Patient/"), []).append(resource)
    return by_patient


def searchset(resources: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(resources),
        "entry": [{"resource": r, "search": {"mode": "match"}} for r in resources],
    }


def prefetch_for(records: dict[str, list[dict[str, Any]]], pid: str = PID) -> dict[str, Any]:
    mine = records[pid]
    return {
        "patient": next(r for r in mine if r["resourceType"] == "Patient"),
        "observations": searchset([r for r in mine if r["resourceType"] == "Observation"]),
        "conditions": searchset([r for r in mine if r["resourceType"] == "Condition"]),
    }


def hook_request(hook: str = "patient-view", pid: str = PID, **fields: Any) -> dict[str, Any]:
    context: dict[str, Any] = {"userId": "Practitioner/example", "patientId": pid}
    if hook == "order-select":
        context["selections"] = ["MedicationRequest/rx-1"]
        context["draftOrders"] = searchset([medication_request(pid)]) | {"type": "collection"}
    if hook == "medication-prescribe":
        context["medications"] = searchset([medication_request(pid)]) | {"type": "collection"}
    return {"hook": hook, "hookInstance": str(uuid.uuid4()), "context": context, **fields}


def medication_request(pid: str) -> dict[str, Any]:
    return {
        "resourceType": "MedicationRequest",
        "id": "rx-1",
        "status": "draft",
        "intent": "order",
        "medicationCodeableConcept": {"text": "Atorvastatin 20 mg"},
        "subject": {"reference": f"Patient/{pid}"},
    }


# -- the app ----------------------------------------------------------------------------------


class Fhir:
    """A FHIR server behind httpx.MockTransport that answers the rendered prefetch queries."""

    def __init__(self, records: dict[str, list[dict[str, Any]]]) -> None:
        self.records = records
        self.requests: list[httpx.Request] = []
        self.fail: Callable[[httpx.Request], httpx.Response | None] = lambda request: None
        self.page_size = 1000

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        failure = self.fail(request)
        if failure is not None:
            return failure
        path = request.url.path.removeprefix("/fhir/")
        query = {k: v[0] for k, v in parse_qs(request.url.query.decode()).items()}
        if path.startswith("Patient/"):
            found = [r for r in self.records.get(path[8:], []) if r["resourceType"] == "Patient"]
            return httpx.Response(200, json=found[0]) if found else httpx.Response(404)
        matches = [
            r
            for r in self.records.get(query["patient"], [])
            if r["resourceType"] == path and _has_code(r, query.get("code"))
        ]
        start = int(query.get("_offset", 0))
        bundle = searchset(matches[start : start + self.page_size])
        if start + self.page_size < len(matches):
            following = request.url.copy_merge_params({"_offset": start + self.page_size})
            bundle["link"] = [{"relation": "next", "url": str(following)}]
        return httpx.Response(200, json=bundle)


def _has_code(resource: dict[str, Any], codes: str | None) -> bool:
    """What a FHIR server's `code` search does: match Resource.code (not component codes)."""
    if codes is None:
        return True
    tokens = {f"{c.get('system')}|{c['code']}" for c in resource["code"]["coding"]}
    return bool(tokens & set(codes.split(",")))


def make_client(
    scorer: PatientScorer,
    audit: AuditLog | None,
    fhir: Fhir,
    policy: JwtPolicy | None = None,
    settings: CdsSettings | None = None,
    access: FhirAccess | None = None,
) -> TestClient:
    provider = StaticCdsProvider(
        [scorer],
        settings={
            "fed-heart-disease": settings or CdsSettings(outcome_label="Coronary artery disease")
        },
        model_urls={"fed-heart-disease": f"https://hub.example.org/v1/models/{VERSION}"},
    )
    app = FastAPI()
    app.include_router(
        cds_router(
            provider,
            audit=audit,
            jwt=policy,
            pseudonym_key=KEY,
            fhir=access
            or FhirAccess(
                transport=httpx.MockTransport(fhir), timeout_s=2.0, allowed_servers=(FHIR,)
            ),
            allow_unauthenticated=policy is None,  # a TestClient: loopback only
        )
    )
    return TestClient(app)


def post(client: TestClient, body: Any, service: str = SERVICE, **kwargs: Any) -> httpx.Response:
    response: httpx.Response = client.post(f"/cds-services/{service}", json=body, **kwargs)
    return response


def the_card(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    cards = response.json()["cards"]
    assert len(cards) == 1
    card: dict[str, Any] = cards[0]
    return card


def events(audit: AuditLog, action: str | None = None) -> list[Any]:
    return [e for e in audit.events() if action is None or e.action == action]


# -- what a CDS Client does --------------------------------------------------------------------


def run_prefetch(
    templates: dict[str, str], context: dict[str, Any], resources: list[dict[str, Any]]
) -> dict[str, Any]:
    """What a CDS Client does: render each template and answer it from the patient's record."""
    answers: dict[str, Any] = {}
    for key, template in templates.items():
        url = urlsplit(render_template(template, context))
        if "/" in url.path:
            kind, rid = url.path.split("/")
            answers[key] = next(
                r for r in resources if r["resourceType"] == kind and r["id"] == rid
            )
            continue
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        matches = [
            r
            for r in resources
            if r["resourceType"] == url.path
            and r.get("subject", {}).get("reference") == f"Patient/{query['patient']}"
            and _has_code(r, query.get("code"))
        ]
        answers[key] = searchset(matches)
    return answers


ISSUER = "https://ehr.example.org/"
BASE = "https://cds.example.org"
ENDPOINT = "/cds-services/fed-heart-disease-patient-view"


class Signer:
    """A CDS Client's key pair, and the JWTs it signs."""

    def __init__(self, alg: str, kid: str = "k1") -> None:
        self.alg, self.kid = alg, kid
        if alg.startswith("ES"):
            self.key: Any = ec.generate_private_key(ec.SECP384R1())
            self.jwk = jwt.algorithms.ECAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
        else:
            self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            self.jwk = jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
        self.jwk["kid"] = kid

    def token(
        self, endpoint: str = ENDPOINT, headers: dict[str, Any] | None = None, **claims: Any
    ) -> str:
        now = int(time.time())
        body = {
            "iss": ISSUER,
            "aud": BASE + endpoint,
            "iat": now,
            "exp": now + 60,
            "jti": str(uuid.uuid4()),
            "tenant": "st-olav",
        } | claims
        header = {"kid": self.kid, "typ": "JWT"} | (headers or {})
        return jwt.encode(
            {k: v for k, v in body.items() if v is not None},
            self.key,
            algorithm=self.alg,
            headers=header,
        )
