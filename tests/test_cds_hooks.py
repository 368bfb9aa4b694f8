"""The CDS Hooks service in-process (aipipe.cds.service): discovery, the three hooks answered
with a risk card, a Synthea patient end to end, and the service's own failures (no audit, no model).
Shared fixtures: tests/conftest.py; helpers: tests/cds_support.py."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from fhirclient.models.riskassessment import RiskAssessment

from aipipe.audit import AuditLog
from aipipe.cds import (
    CdsSettings,
    PatientScorer,
    StaticCdsProvider,
    cds_router,
    prefetch_templates,
)
from aipipe.errors import StoreError
from aipipe.fhir.files import read_bundle
from aipipe.models import build_model, weights_to_arrays
from aipipe.study.preprocessing import Preprocessor
from aipipe.study.spec import StudySpec, load_study
from tests.cds_support import (
    KEY,
    PID,
    ROOT,
    SHARED,
    VERSION,
    Fhir,
    hook_request,
    make_client,
    post,
    prefetch_for,
    run_prefetch,
    the_card,
)

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


# -- a Synthea patient end to end ----------------------------------------------------------------


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
