"""The hub serving CDS Hooks for a model trained by real nodes: two node processes train the
Synthea diabetes study, then a patient-view request built from a shipped Synthea patient gets
a well-formed card with a RiskAssessment suggestion."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from aipipe.fhir.files import read_bundle
from tests.e2e_support import (
    ProcessGroup,
    aipipe,
    aipipe_in_process,
    aipipe_json,
    start_hub,
    wait_until,
)

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO.parent / "shared" / "data" / "synthea_fhir_r4" / "bundles"
STUDY = REPO / "examples" / "synthea" / "study.yaml"


def _patient_resources(bundle: Path) -> list[dict[str, Any]]:
    return [item.resource for item in read_bundle(bundle) if item.error is None]


@pytest.fixture(scope="module")
def trained_hub(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[str, str, Path, Path]]:
    if not BUNDLES.is_dir():
        pytest.skip(f"Synthea bundles not found at {BUNDLES}")
    root = tmp_path_factory.mktemp("cds-e2e")
    raw = yaml.safe_load(STUDY.read_text())
    raw["training"] = {"rounds": 2, "local_steps": 5, "batch_size": 4, "lr": 0.05}
    raw["min_nodes"] = 2
    study_file = root / "study.yaml"
    study_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    bundles = sorted(BUNDLES.glob("*.json"))
    group = ProcessGroup(root / "logs")
    try:
        token = aipipe_json("hub", "init", "--home", root / "hub", "--json")["admin_token"]
        hub = start_hub(group, root / "hub")
        admin = {"AIPIPE_HUB_URL": hub.url, "AIPIPE_TOKEN": token}
        for index, site in enumerate(("east", "west")):
            home = root / site
            enrol = aipipe_json("hub", "enrol-token", "--home", root / "hub", "--node", site,
                                "--json")["token"]  # fmt: skip
            aipipe("node", "init", "--home", home, "--name", site,
                   env={"AIPIPE_ENROL_TOKEN": enrol})  # fmt: skip
            aipipe("node", "ingest", "--home", home, *bundles[index::2])
        aipipe("study", "publish", study_file, env=admin)
        for site in ("east", "west"):
            aipipe_in_process("node", "approve", raw["name"], "--home", root / site)
            group.start(site, "node", "start", "--home", root / site, "--poll", "1")
        aipipe("train", "run", "--study", raw["name"], "--rounds", "2", "--json", env=admin,
               timeout_s=300)  # fmt: skip
        yield hub.url, raw["name"], bundles[0], root
    finally:
        group.stop()


def test_discovery_lists_the_trained_study_on_every_hook(
    trained_hub: tuple[str, str, Path, Path],
) -> None:
    url, study, _, _ = trained_hub

    services = httpx.get(f"{url}/cds-services", timeout=30).json()["services"]

    hooks = {s["hook"] for s in services if s["id"].startswith(study)}
    assert hooks == {"patient-view", "order-select", "medication-prescribe"}


def _patient_view(bundle: Path) -> dict[str, Any]:
    resources = _patient_resources(bundle)
    patient = next(r for r in resources if r["resourceType"] == "Patient")
    observations = [r for r in resources if r["resourceType"] == "Observation"]
    return {
        "hook": "patient-view",
        "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
        "context": {"userId": "Practitioner/example", "patientId": patient["id"]},
        "prefetch": {
            "patient": patient,
            "observations": {"resourceType": "Bundle", "type": "searchset",
                             "entry": [{"resource": o} for o in observations]},
        },
    }  # fmt: skip


def test_patient_view_for_a_synthea_patient_returns_a_well_formed_risk_card(
    trained_hub: tuple[str, str, Path, Path],
) -> None:
    url, study, bundle, _ = trained_hub
    request = _patient_view(bundle)
    patient = request["prefetch"]["patient"]

    response = httpx.post(f"{url}/cds-services/{study}-patient-view", json=request, timeout=60)

    assert response.status_code == 200, response.text
    cards = response.json()["cards"]
    assert len(cards) == 1
    card = cards[0]
    assert len(card["summary"]) < 140
    assert card["indicator"] in ("info", "warning", "critical")
    assert card["source"]["label"] and card["uuid"]
    action = card["suggestions"][0]["actions"][0]
    assert action["type"] == "create"
    risk = action["resource"]
    assert risk["resourceType"] == "RiskAssessment" and risk["status"] == "final"
    assert risk["subject"]["reference"] == f"Patient/{patient['id']}"
    assert 0.0 <= risk["prediction"][0]["probabilityDecimal"] <= 1.0
    json.dumps(card)  # the card is plain JSON all the way down


def test_node_predict_scores_its_cohort_with_the_federated_model(
    trained_hub: tuple[str, str, Path, Path],
) -> None:
    _, study, _, root = trained_hub

    report = json.loads(aipipe("node", "predict", "--home", root / "east", "--study", study,
                               "--json").stdout)  # fmt: skip

    assert report["scored"] == 20 and report["unscored"] == 0 and report["written"] == 0
    assert all(0.0 <= p["probability"] <= 1.0 for p in report["predictions"])
    assert all(len(p["patient"]) == 20 for p in report["predictions"])  # pseudonyms, not ids


def test_node_serves_cds_hooks_inside_the_hospital(
    trained_hub: tuple[str, str, Path, Path], tmp_path: Path
) -> None:
    _, study, bundle, root = trained_hub
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    group = ProcessGroup(tmp_path / "logs")
    try:
        server = group.start("node-cds", "node", "serve-cds", "--home", root / "east",
                             "--study", study, "--port", str(port))  # fmt: skip
        base = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            try:
                return httpx.get(f"{base}/cds-services", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(ready, what="node serve-cds", context=server.log_tail)
        response = httpx.post(f"{base}/cds-services/{study}-patient-view",
                              json=_patient_view(bundle), timeout=60)  # fmt: skip
    finally:
        group.stop()

    assert response.status_code == 200, response.text
    card = response.json()["cards"][0]
    assert card["suggestions"][0]["actions"][0]["resource"]["resourceType"] == "RiskAssessment"
