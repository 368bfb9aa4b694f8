"""What the CDS service reads and what it will score (issue 11, items 1 and 4).

A long record (420 hourly blood-pressure panels) is read from a real FHIR server (sekmet) with
`_count`, `_sort=-date` and code filters, paging to the end within the request's budget, and
scored. Prefetched Observations that name the patient by a `urn:uuid:` reference are resolved
the way a server would, and a patient with too few of the model's inputs gets an info card, never
a score on imputed values.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from aipipe.cds import (
    CdsSettings,
    FhirAccess,
    PatientScorer,
    StaticCdsProvider,
    cds_router,
    prefetch_templates,
)
from aipipe.fhir.files import read_bundle
from aipipe.models import build_model, weights_to_arrays
from aipipe.study.preprocessing import Preprocessor
from aipipe.study.spec import StudySpec, load_study
from tests.cds_support import KEY, VERSION, run_prefetch, searchset
from tests.fhir_server import FhirTestServer, start_fhir_server

ROOT = Path(__file__).resolve().parents[1]
BUNDLES = ROOT.parent / "shared" / "data" / "synthea_fhir_r4" / "bundles"
SERVICE = "synthea-diabetes-patient-view"
LOINC = "http://loinc.org"
PANELS = 420


@pytest.fixture(scope="module")
def study() -> StudySpec:
    # No population: reading and resolving the record is the subject here, not who is scored
    # (tests/test_scoring_safety.py); the bundle's labs are older than the example's look-back.
    return load_study(ROOT / "examples" / "synthea" / "study.yaml").model_copy(
        update={"population": None}
    )


@pytest.fixture(scope="module")
def scorer(study: StudySpec) -> PatientScorer:
    """A fixed model over the Synthea study: training is not what these tests are about."""
    columns = study.columns()
    weights = weights_to_arrays(build_model(study.model, len(columns), seed=3))
    typical = {"hba1c": 5.6, "glucose": 95.0, "cholesterol": 190.0, "ldl": 110.0, "bmi": 27.0,
               "systolic_bp": 125.0, "diastolic_bp": 80.0, "age": 50.0}  # fmt: skip
    mean = np.array([typical.get(c, 0.5) for c in columns])
    fills = {i: 1.0 if c.endswith("_missing") else mean[i] for i, c in enumerate(columns)}
    return PatientScorer(study, weights, Preprocessor(fills, mean, mean / 5 + 0.1), VERSION)


def synthea_bundle() -> dict[str, Any]:
    """The first shipped Synthea bundle, as an EHR would POST it (a transaction)."""
    if not BUNDLES.is_dir():
        pytest.skip(f"Synthea bundles not found at {BUNDLES}")
    import json

    bundle: dict[str, Any] = json.loads(sorted(BUNDLES.glob("*.json"))[0].read_bytes())
    return bundle


def client_for(scorer: PatientScorer, access: FhirAccess) -> TestClient:
    provider = StaticCdsProvider(
        [scorer], settings={"synthea-diabetes": CdsSettings(outcome_label="Type 2 diabetes")}
    )
    app = FastAPI()
    app.include_router(
        cds_router(
            provider, audit=None, jwt=None, pseudonym_key=KEY, fhir=access,
            allow_unauthenticated=True,  # a TestClient: loopback only
        )
    )  # fmt: skip
    return TestClient(app)


def hook(pid: str, **fields: Any) -> dict[str, Any]:
    context = {"userId": "Practitioner/example", "patientId": pid}
    return {"hook": "patient-view", "hookInstance": str(uuid.uuid4()), "context": context} | fields


# -- item 1: a long record read from a real FHIR server ------------------------------------------


def bp_panel(subject: str, when: datetime, systolic: float, diastolic: float) -> dict[str, Any]:
    def component(code: str, value: float) -> dict[str, Any]:
        return {
            "code": {"coding": [{"system": LOINC, "code": code}]},
            "valueQuantity": {"value": value, "unit": "mm[Hg]", "system": "http://unitsofmeasure.org",
                              "code": "mm[Hg]"},
        }  # fmt: skip

    return {
        "resourceType": "Observation",
        "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/"
                                  "observation-category", "code": "vital-signs"}]}],
        "code": {"coding": [{"system": LOINC, "code": "85354-9"}]},
        "subject": {"reference": subject},
        "effectiveDateTime": when.isoformat(),
        "component": [component("8480-6", systolic), component("8462-4", diastolic)],
    }  # fmt: skip


class Recording(httpx.AsyncBaseTransport):
    """The real network, with every request kept."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.requests: list[httpx.Request] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.fixture(scope="module")
def long_record(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FhirTestServer, str]]:
    bundle = synthea_bundle()
    patient = next(e for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient")
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=PANELS + 1)
    for hour in range(PANELS):
        panel = bp_panel(patient["fullUrl"], start + timedelta(hours=hour), 150.0, 95.0)
        bundle["entry"].append(
            {"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": panel,
             "request": {"method": "POST", "url": "Observation"}}
        )  # fmt: skip
    with start_fhir_server(tmp_path_factory.mktemp("sekmet-long")) as server:
        response = server.post_bundle(bundle)
        location = next(
            e["response"]["location"]
            for e in response["entry"]
            if e["response"]["location"].startswith("Patient/")
            or "/Patient/" in e["response"]["location"]
        )
        pid = location.split("Patient/")[1].split("/")[0]
        yield server, pid


@pytest.mark.e2e
def test_a_long_record_is_read_to_the_end_with_count_sort_and_codes(
    long_record: tuple[FhirTestServer, str], scorer: PatientScorer
) -> None:
    server, pid = long_record
    recording = Recording()
    access = FhirAccess(allowed_servers=(server.base_url,), allow_http=True, transport=recording)

    response = client_for(scorer, access).post(
        f"/cds-services/{SERVICE}", json=hook(pid, fhirServer=server.base_url)
    )

    assert response.status_code == 200, response.text
    (card,) = response.json()["cards"]
    assert card["suggestions"], card
    basis = card["suggestions"][0]["actions"][0]["resource"]["basis"]
    assert len(basis) > PANELS  # the mean blood pressure read every panel
    first = next(r for r in recording.requests if r.url.path.endswith("/Observation"))
    params = dict(first.url.params)
    assert int(params["_count"]) >= 100
    assert params["_sort"] == "-date"
    assert f"{LOINC}|85354-9" in params["code"].split(",")


# -- item 4: urn:uuid subjects, and too few inputs ------------------------------------------------


@pytest.fixture(scope="module")
def synthea_prefetch(study: StudySpec) -> tuple[str, dict[str, Any]]:
    synthea_bundle()  # skips without the data
    path = sorted(BUNDLES.glob("*.json"))[0]
    resources = [item.resource for item in read_bundle(path) if item.error is None]
    patient = next(r for r in resources if r["resourceType"] == "Patient")
    context = {"userId": "Practitioner/example", "patientId": patient["id"]}
    return patient["id"], run_prefetch(prefetch_templates(study), context, resources)


@pytest.mark.parametrize("alias", ["own-id", "entry-fullurl"])
def test_observations_naming_the_patient_by_urn_uuid_are_scored_and_cited(
    synthea_prefetch: tuple[str, dict[str, Any]], scorer: PatientScorer, alias: str
) -> None:
    pid, original = synthea_prefetch
    prefetch = copy.deepcopy(original)
    observations = prefetch["observations"]
    if alias == "own-id":
        reference = f"urn:uuid:{pid}"
    else:  # the Patient rides along in the searchset (`_include`) under a fullUrl of its own
        reference = f"urn:uuid:{uuid.uuid4()}"
        patient_entry = {"fullUrl": reference, "resource": prefetch["patient"],
                         "search": {"mode": "include"}}  # fmt: skip
        observations["entry"].append(patient_entry)
    ids = []
    for entry in observations["entry"]:
        if entry["resource"]["resourceType"] == "Observation":
            entry["resource"]["subject"] = {"reference": reference}
            ids.append(f"Observation/{entry['resource']['id']}")

    response = client_for(scorer, FhirAccess()).post(
        f"/cds-services/{SERVICE}", json=hook(pid, prefetch=prefetch)
    )

    assert response.status_code == 200, response.text
    (card,) = response.json()["cards"]
    assert "another patient" not in card.get("detail", "")
    basis = {b["reference"] for b in card["suggestions"][0]["actions"][0]["resource"]["basis"]}
    assert basis & set(ids)
    assert len(basis) > 2


def test_a_patient_with_none_of_the_inputs_gets_an_info_card_and_no_suggestion(
    synthea_prefetch: tuple[str, dict[str, Any]], scorer: PatientScorer
) -> None:
    pid, original = synthea_prefetch
    prefetch = copy.deepcopy(original) | {"observations": searchset([])}

    response = client_for(scorer, FhirAccess()).post(
        f"/cds-services/{SERVICE}", json=hook(pid, prefetch=prefetch)
    )

    assert response.status_code == 200, response.text
    (card,) = response.json()["cards"]
    assert card["indicator"] == "info"
    assert not card.get("suggestions")
    assert "not scored" in card["summary"]
    assert "hba1c" in card["detail"] and "systolic" in card["detail"]


def test_an_unknown_urn_uuid_subject_is_still_another_patient(
    synthea_prefetch: tuple[str, dict[str, Any]], scorer: PatientScorer
) -> None:
    pid, original = synthea_prefetch
    prefetch = copy.deepcopy(original)
    for entry in prefetch["observations"]["entry"]:
        entry["resource"]["subject"] = {"reference": f"urn:uuid:{uuid.uuid4()}"}

    response = client_for(scorer, FhirAccess()).post(
        f"/cds-services/{SERVICE}", json=hook(pid, prefetch=prefetch)
    )

    (card,) = response.json()["cards"]
    assert "skipped: another patient" in card["detail"]
    assert not card.get("suggestions")
