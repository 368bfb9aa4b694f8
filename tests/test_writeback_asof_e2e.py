"""Write-back against a real FHIR R4 server (sekmet): a score is computed from the record as of
now (or an explicit as-of day), says so in `occurrenceDateTime` and `basis`, and a RiskAssessment
the EHR created from a CDS card's suggestion is the one a later write-back updates."""

from __future__ import annotations

import json
import secrets
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from aipipe.cds import CdsSettings, ModelSource, PatientScorer, build_cards
from aipipe.fhir.server import DEFAULT_TYPES, FhirServerSource
from aipipe.node.home import init_node, open_store
from aipipe.node.ingest import ingest_server
from aipipe.node.predict import Prediction, predict_cohort, write_back
from aipipe.store.node_store import NodeStore
from aipipe.study.blocks import Split
from aipipe.study.features import extract
from aipipe.study.spec import StudySpec, load_study
from tests.fhir_server import start_fhir_server

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
SYNTHEA = REPO.parent / "shared" / "data" / "synthea_fhir_r4"
STUDY = REPO / "examples" / "synthea" / "study.yaml"
TOKEN = secrets.token_urlsafe(24)
VERSION = "c" * 64


class _Bearer(httpx.Auth):
    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response]:
        request.headers["Authorization"] = f"Bearer {TOKEN}"
        yield request


@dataclass
class Site:
    base_url: str
    source: FhirServerSource
    store: NodeStore
    spec: StudySpec
    weights: dict[str, np.ndarray]
    patient: str  # the FHIR id of the patient the tests look at

    def get(self, path: str, **params: Any) -> dict[str, Any]:
        response = httpx.get(f"{self.base_url}/{path}", params=params, timeout=30,
                             headers={"Authorization": f"Bearer {TOKEN}"})  # fmt: skip
        response.raise_for_status()
        return dict(response.json())

    def post(self, resource: dict[str, Any]) -> dict[str, Any]:
        response = httpx.post(f"{self.base_url}/{resource['resourceType']}", json=resource,
                              timeout=30, headers={"Authorization": f"Bearer {TOKEN}",
                                                   "Prefer": "return=representation"})  # fmt: skip
        response.raise_for_status()
        return dict(response.json())

    def assessments(self) -> list[dict[str, Any]]:
        bundle = self.get("RiskAssessment", _count=100, subject=f"Patient/{self.patient}")
        found = [entry["resource"] for entry in bundle.get("entry", [])]
        return [r for r in found if r["subject"]["reference"] == f"Patient/{self.patient}"]

    def ingest(self) -> None:
        ingest_server(self.store, self.source, source_key="ehr", resource_types=DEFAULT_TYPES)


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    if not SYNTHEA.is_dir():
        pytest.skip(f"Synthea data not found at {SYNTHEA}")
    bundles = sorted((SYNTHEA / "bundles").glob("*.json"), key=lambda p: p.stat().st_size)[:3]
    spec = load_study(STUDY)
    # Raw (unscaled) inputs and a model that reads HbA1c only: the score moves with the lab
    # and nothing else, whatever three patients' spread would do to a site's z-scores.
    raw = spec.preprocessing.model_copy(update={"standardize": "none"})
    split = Split(method="seeded", seed=43, test_fraction=0.34)
    # No population: the as-of cut-off is the subject, not the look-back window or age range.
    spec = spec.model_copy(update={"split": split, "preprocessing": raw, "population": None})
    head = np.zeros((1, len(spec.columns())), np.float32)
    head[0, spec.columns().index("hba1c")] = 0.4
    weights = {"head.weight": head, "head.bias": np.array([-3.0], np.float32)}
    store = open_store(init_node(tmp_path / "node", "n1"))
    (tmp_path / "ehr").mkdir()
    settings = {"types": ["bearer"], "tokens": [TOKEN]}
    with start_fhir_server(tmp_path / "ehr", settings) as server:
        server.client.headers["Authorization"] = f"Bearer {TOKEN}"
        for bundle in bundles:
            server.post_bundle(json.loads(bundle.read_text()))
        with FhirServerSource(base_url=server.base_url, auth=_Bearer()) as source:
            made = Site(server.base_url, source, store, spec, weights, "")
            made.ingest()
            made.patient = str(store.conn.execute("SELECT min(id) FROM patients").fetchone()[0])
            yield made
    store.close()


def _new_hba1c(site: Site, when: datetime) -> str:
    """A new HbA1c of 11.5 % for the patient, dated after the study's reference date."""
    created = site.post({
        "resourceType": "Observation", "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "4548-4"}]},
        "subject": {"reference": f"Patient/{site.patient}"},
        "effectiveDateTime": when.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "valueQuantity": {"value": 11.5, "unit": "%", "system": "http://unitsofmeasure.org",
                          "code": "%"},
    })  # fmt: skip
    return str(created["id"])


def _mine(site: Site, predictions: list[Prediction]) -> Prediction:
    (found,) = [p for p in predictions if p.patient_id == site.patient]
    assert found.assessment is not None and found.probability is not None
    return found


def _basis(assessment: dict[str, Any]) -> set[str]:
    return {ref["reference"] for ref in assessment.get("basis", [])}


def test_write_back_scores_the_record_as_of_now_and_says_so(site: Site) -> None:
    assert site.spec.reference_date is not None
    now = datetime.now(UTC).replace(microsecond=0)
    lab_time = now - timedelta(days=3)
    assert lab_time.date() > site.spec.reference_date
    lab = _new_hba1c(site, lab_time)
    site.ingest()

    before_lab: date = lab_time.date() - timedelta(days=1)
    earlier = _mine(site, predict_cohort(site.store, site.spec, site.weights, VERSION, now=now,
                                         as_of=before_lab))  # fmt: skip
    current = _mine(site, predict_cohort(site.store, site.spec, site.weights, VERSION, now=now))
    write_back(site.source, [current])
    (written,) = site.assessments()

    # As of now: the new lab is read, named in the basis, and moves the score.
    assert f"Observation/{lab}" in _basis(written)
    assert written["occurrenceDateTime"] == now.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert written["prediction"][0]["probabilityDecimal"] == round(current.probability or 0, 4)
    assert current.probability != earlier.probability
    # As of the day before the lab: the lab is not used, and the occurrence is that day.
    assert earlier.assessment is not None
    assert f"Observation/{lab}" not in _basis(earlier.assessment)
    assert earlier.assessment["occurrenceDateTime"] == before_lab.isoformat()
    # Every Observation named in the basis exists on the server and is dated by the as-of day.
    for ref in _basis(earlier.assessment) - {f"Patient/{site.patient}"}:
        observation = site.get(ref)
        assert observation["effectiveDateTime"][:10] <= before_lab.isoformat()


def test_an_accepted_card_and_a_later_write_back_are_one_risk_assessment(site: Site) -> None:
    spec, store = site.spec, site.store
    scorer = PatientScorer(spec, site.weights, extract(store, spec).preprocessor, VERSION)
    resources = [json.loads(text) for (text,) in store.conn.execute(
        "SELECT json FROM resources WHERE patient_id = ?", (site.patient,))]  # fmt: skip
    now = datetime.now(UTC)
    result = scorer.score(resources, patient_id=site.patient, as_of=now.date())
    settings = CdsSettings()
    source = ModelSource.for_study(spec, VERSION, settings)
    (card,) = build_cards(result, source=source, settings=settings, now=now)
    assert card.suggestions is not None
    actions = card.suggestions[0].actions
    assert actions is not None and actions[0].resource is not None
    suggested = actions[0].resource
    site.post(dict(suggested))  # the EHR accepts the suggestion: a plain create
    assert len(site.assessments()) == 1

    written = write_back(site.source, predict_cohort(store, spec, site.weights, VERSION, now=now))
    assert written == 3
    (held,) = site.assessments()
    assert held["meta"]["versionId"] == "2"  # write-back updated the accepted card's resource
    assert held["identifier"] == suggested["identifier"]
