"""RiskAssessment write-back through a real FHIR R4 server (sekmet) with SMART Backend Services:
pull Synthea patients with a SMART token, score them, write the scores back by conditional
update under `system/RiskAssessment.cu`, read them back, re-run."""

from __future__ import annotations

import json
import secrets
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fhirclient.models.riskassessment import RiskAssessment

from aipipe.cds.cards import IDENTIFIER_SYSTEM
from aipipe.fhir.server import DEFAULT_TYPES, FhirServerSource
from aipipe.fhir.smart import SmartBackendAuth, SmartKey
from aipipe.node.home import init_node, open_store
from aipipe.node.ingest import ingest_server
from aipipe.node.predict import predict_cohort, write_back
from aipipe.study.blocks import Split
from aipipe.study.spec import load_study
from tests.fhir_server import start_fhir_server

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
SYNTHEA = REPO.parent / "shared" / "data" / "synthea_fhir_r4"
STUDY = REPO / "examples" / "synthea" / "study.yaml"


ADMIN_TOKEN = secrets.token_urlsafe(24)


def _smart_settings(key: SmartKey) -> dict[str, Any]:
    client = {"client_id": "node", "jwks": key.public_jwks(),
              "scopes": "system/*.rs system/RiskAssessment.cu"}  # fmt: skip
    return {"types": ["smart", "bearer"], "tokens": [ADMIN_TOKEN], "smart_clients": [client],
            "token_lifetime": 300, "enforce_scopes": True}  # fmt: skip


def _risk_assessments(base_url: str) -> list[dict[str, Any]]:
    bundle = httpx.get(f"{base_url}/RiskAssessment", params={"_count": 100}, timeout=30,
                       headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).json()  # fmt: skip
    return [entry["resource"] for entry in bundle.get("entry", [])]


def test_scores_are_written_back_once_and_updated_on_a_rerun(tmp_path: Path) -> None:
    if not SYNTHEA.is_dir():
        pytest.skip(f"Synthea data not found at {SYNTHEA}")
    bundles = sorted((SYNTHEA / "bundles").glob("*.json"), key=lambda p: p.stat().st_size)[:8]
    # Eight patients, six of them train: a site needs MIN_TRAIN_ROWS train patients to scale
    # the inputs (tests/test_scoring_safety.py). Write-back is the subject here, so a fixed
    # split and no population (some of these patients are children or deceased).
    spec = load_study(STUDY)
    split = Split(method="seeded", seed=43, test_fraction=0.25)
    spec = spec.model_copy(update={"split": split, "population": None})
    weights = {"head.weight": np.full((1, len(spec.columns())), 0.3, np.float32),
               "head.bias": np.array([-0.5], np.float32)}  # fmt: skip
    store = open_store(init_node(tmp_path / "node", "n1"))
    key = SmartKey.generate("ES384")
    (tmp_path / "ehr").mkdir()
    with start_fhir_server(tmp_path / "ehr", _smart_settings(key)) as server:
        server.client.headers["Authorization"] = f"Bearer {ADMIN_TOKEN}"
        for bundle in bundles:
            server.post_bundle(json.loads(bundle.read_text()))
        auth = SmartBackendAuth(base_url=server.base_url, client_id="node", key=key)
        with auth, FhirServerSource(base_url=server.base_url, auth=auth) as source:
            ingest_server(store, source, source_key="ehr", resource_types=DEFAULT_TYPES)
            first = predict_cohort(store, spec, weights, "a" * 64, now=datetime.now(UTC))
            written = write_back(source, first)
            after_first = _risk_assessments(server.base_url)
            rerun = predict_cohort(store, spec, weights, "b" * 64, now=datetime.now(UTC))
            write_back(source, rerun)
            after_rerun = _risk_assessments(server.base_url)
    store.close()

    assert auth.granted_scopes is not None and "system/RiskAssessment.cu" in auth.granted_scopes
    scored = [p for p in first if p.probability is not None]
    # A patient this small site cannot scale (a value where its train patients had no spread)
    # is not scored, and says why; every scored one is written once.
    assert all(p.reasons for p in first if p.probability is None)
    assert len(scored) >= 3
    assert written == len(scored) == len(after_first) == len(after_rerun)
    for resource in after_rerun:
        RiskAssessment(resource, strict=True)  # valid R4 structure
        assert resource["status"] == "final"
        assert resource["method"]["coding"][0]["code"] == "b" * 64
        assert resource["identifier"][0]["system"] == IDENTIFIER_SYSTEM
        assert resource["meta"]["versionId"] == "2"  # the re-run updated, not duplicated
        probability = resource["prediction"][0]["probabilityDecimal"]
        assert 0.0 <= probability <= 1.0
        assert all(ref["reference"].split("/")[0] in ("Observation", "Patient")
                   for ref in resource.get("basis", []))  # fmt: skip
    subjects = {r["subject"]["reference"] for r in after_rerun}
    assert subjects == {f"Patient/{p.patient_id}" for p in scored}
