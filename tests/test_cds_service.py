"""The CDS Hooks service in-process: discovery, hooks, prefetch and fhirServer, errors, feedback,
audit and JWT (aipipe.cds.service), over a logistic model trained on Cleveland's heart data."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import numpy as np
import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from fhirclient.models.riskassessment import RiskAssessment

from aipipe.audit import AuditLog
from aipipe.cds import (
    CdsSettings,
    FhirAccess,
    JwtPolicy,
    PatientScorer,
    StaticCdsProvider,
    cds_router,
    prefetch_templates,
    render_template,
)
from aipipe.errors import StoreError
from aipipe.fhir.files import read_bundle
from aipipe.models import build_model, weights_to_arrays
from aipipe.node.ingest import ingest_files
from aipipe.node.training import train_local
from aipipe.store.node_store import NodeStore
from aipipe.study.features import Preprocessor, extract
from aipipe.study.spec import Privacy, StudySpec, Training, load_study
from tests.test_cds_auth import BASE, ISSUER, Signer

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


@pytest.fixture(scope="module")
def heart() -> StudySpec:
    return load_study(ROOT / "examples" / "heart-disease" / "study.yaml")


@pytest.fixture(scope="module")
def scorer(heart: StudySpec, tmp_path_factory: pytest.TempPathFactory) -> PatientScorer:
    store = NodeStore.open(tmp_path_factory.mktemp("node") / "store.sqlite", KEY)
    ingest_files(store, [CLEVELAND])
    matrix = extract(store, heart)
    store.close()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = build_model(heart.model, len(matrix.columns), seed=0)
    result = train_local(
        model,
        matrix.x_train,
        matrix.y_train,
        training=Training(local_steps=200, batch_size=32, lr=0.05),
        privacy=Privacy(mode="none"),
        noise_multiplier=None,
        seed=1,
    )
    torch.set_num_threads(threads)
    return PatientScorer(heart, result.weights, matrix.preprocessor, VERSION)


@pytest.fixture(scope="module")
def records() -> dict[str, list[dict[str, Any]]]:
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


@pytest.fixture
def fhir(records: dict[str, list[dict[str, Any]]]) -> Fhir:
    return Fhir(records)


@pytest.fixture
def audit(tmp_path: Path) -> Iterator[AuditLog]:
    with AuditLog.open(tmp_path / "audit.sqlite", None, owner="hub/test") as log:
        yield log


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


@pytest.fixture
def client(scorer: PatientScorer, audit: AuditLog, fhir: Fhir) -> TestClient:
    return make_client(scorer, audit, fhir)


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


# -- discovery --------------------------------------------------------------------------------


def test_discovery_lists_one_service_per_hook_with_prefetch_templates(
    client: TestClient, heart: StudySpec
) -> None:
    response = client.get("/cds-services")

    assert response.status_code == 200
    services = response.json()["services"]
    assert {(s["id"], s["hook"]) for s in services} == {
        (f"fed-heart-disease-{hook}", hook)
        for hook in ("patient-view", "order-select", "medication-prescribe")
    }
    assert all(s["prefetch"] == prefetch_templates(heart) for s in services)
    assert all(s["description"] and s["title"] for s in services)


# -- the three hooks with prefetch --------------------------------------------------------------


@pytest.mark.parametrize("hook", ["patient-view", "order-select", "medication-prescribe"])
def test_each_hook_with_prefetch_answers_a_risk_card(
    client: TestClient, records: dict[str, list[dict[str, Any]]], hook: str
) -> None:
    body = hook_request(hook, prefetch=prefetch_for(records))

    card = the_card(post(client, body, service=f"fed-heart-disease-{hook}"))

    assert card["summary"].startswith("Coronary artery disease risk ")
    assert card["indicator"] in ("info", "warning", "critical")
    assert card["selectionBehavior"] == "at-most-one"
    resource = card["suggestions"][0]["actions"][0]["resource"]
    parsed = RiskAssessment(resource, strict=True)
    assert parsed.subject.reference == f"Patient/{PID}"
    assert f"Observation/{PID}-chol" in {b.reference for b in parsed.basis}


def test_the_card_says_when_the_outcome_is_already_on_record(
    client: TestClient, records: dict[str, list[dict[str, Any]]]
) -> None:
    card = the_card(post(client, hook_request(prefetch=prefetch_for(records))))

    assert "the record already lists Coronary artery disease" in card["detail"]


def test_a_patient_under_every_threshold_gets_an_info_card(
    scorer: PatientScorer, audit: AuditLog, fhir: Fhir, records: dict[str, list[dict[str, Any]]]
) -> None:
    settings = CdsSettings(moderate_at=1.0, warning_at=1.0, critical_at=1.0)
    client = make_client(scorer, audit, fhir, settings=settings)
    body = hook_request(pid="cleveland-0001", prefetch=prefetch_for(records, "cleveland-0001"))

    card = the_card(post(client, body))

    assert card["indicator"] == "info" and card["summary"].endswith("(low)")


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


# -- JWT over HTTP (the policy's own checks: test_cds_auth.py) -------------------------------------


@pytest.fixture(scope="module")
def es384() -> Signer:
    return Signer("ES384")


@pytest.fixture(scope="module")
def rs384() -> Signer:
    return Signer("RS384", kid="k2")


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


# -- a Synthea patient end to end ----------------------------------------------------------------


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


def test_a_synthea_patient_view_prefetch_gets_a_well_formed_card(tmp_path: Path) -> None:
    # This bundle's labs are older than the example's two-year look-back (its `population`);
    # the card's form is the subject here, so no population (tests/test_scoring_safety.py).
    study = load_study(ROOT / "examples" / "synthea" / "study.yaml")
    study = study.model_copy(update={"population": None})
    bundle = sorted((SHARED / "data" / "synthea_fhir_r4" / "bundles").glob("*.json"))[0]
    resources = [item.resource for item in read_bundle(bundle) if item.error is None]
    patient = next(r for r in resources if r["resourceType"] == "Patient")
    columns = study.columns()
    weights = weights_to_arrays(build_model(study.model, len(columns), seed=3))
    fills = {i: 1.0 if c.endswith("_missing") else 0.0 for i, c in enumerate(columns)}
    typical = {
        "hba1c": 5.6,
        "glucose": 95.0,
        "cholesterol": 190.0,
        "ldl": 110.0,
        "bmi": 27.0,
        "systolic_bp": 125.0,
        "diastolic_bp": 80.0,
        "age": 50.0,
        "sex": 0.5,
    }
    mean = np.array([typical.get(c, 0.5) for c in columns])
    preprocessor = Preprocessor(
        {**fills, **{i: mean[i] for i in fills if not columns[i].endswith("_missing")}},
        mean,
        mean / 5 + 0.1,
    )
    scorer = PatientScorer(study, weights, preprocessor, VERSION)
    context = {"userId": "Practitioner/example", "patientId": patient["id"]}
    prefetch = run_prefetch(prefetch_templates(study), context, resources)
    client = make_client(scorer, None, Fhir({}))

    response = client.post(
        "/cds-services/synthea-diabetes-patient-view",
        json={
            "hook": "patient-view",
            "hookInstance": str(uuid.uuid4()),
            "context": context,
            "prefetch": prefetch,
        },
    )

    card = the_card(response)
    assert len(card["summary"]) < 140 and card["summary"].startswith("Type 2 diabetes risk ")
    assert any(
        e["resource"]["code"]["coding"][0]["code"] == "55284-4"
        for e in prefetch["observations"]["entry"]
    )
    resource = card["suggestions"][0]["actions"][0]["resource"]
    parsed = RiskAssessment(resource, strict=True)
    assert parsed.subject.reference == f"Patient/{patient['id']}"
    assert len(parsed.basis) > 2


# -- the service's own failures -------------------------------------------------------------------


class BrokenAudit:
    def append(self, action: str, **fields: Any) -> object:
        raise StoreError("audit log is locked")


def test_a_call_that_cannot_be_audited_is_not_served(
    scorer: PatientScorer, fhir: Fhir, records: dict[str, list[dict[str, Any]]]
) -> None:
    client = make_client(scorer, BrokenAudit(), fhir)  # type: ignore[arg-type]

    response = post(client, hook_request(prefetch=prefetch_for(records)))

    assert response.status_code == 503
    assert "audit" in response.json()["issue"][0]["diagnostics"]


def test_a_listed_service_without_a_model_is_503(
    scorer: PatientScorer, records: dict[str, list[dict[str, Any]]]
) -> None:
    class NoModels(StaticCdsProvider):
        def scorer(self, service_id: str) -> PatientScorer | None:
            return None

    app = FastAPI()
    app.include_router(
        cds_router(
            NoModels([scorer]), audit=None, jwt=None, pseudonym_key=KEY, allow_unauthenticated=True
        )
    )

    response = post(TestClient(app), hook_request(prefetch=prefetch_for(records)))

    assert response.status_code == 503


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
