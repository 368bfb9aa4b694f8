"""Issue 11, item 7: cards read as a clinician expects. A study's `cds:` block names the outcome
and sets the thresholds; every card links (`source.url`, `links`) to the model card of the
version that scored it, served by the CDS router itself at the hub and at the node, with the
version's lineage, the study's DP setting, the inputs, the thresholds and (for now, empty)
validation. The real hub app (model registry, pooled statistics) and the node's serve-cds app,
in-process over ASGI."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest
import yaml
from fastapi import FastAPI
from fastapi.testclient import TestClient

from aipipe.audit import AuditLog
from aipipe.cds import PatientScorer, StaticCdsProvider, cds_router, service_entries
from aipipe.errors import StudyError
from aipipe.hub.app import create_app
from aipipe.hub.home import init_hub, load_hub
from aipipe.models import build_model, weights_to_arrays
from aipipe.node.cds import node_cds_app
from aipipe.node.client import HubClient
from aipipe.node.home import init_node, open_audit, open_store
from aipipe.node.ingest import ingest_files
from aipipe.node.predict import predict_cohort
from aipipe.store.node_store import NodeStore
from aipipe.study.features import extract
from aipipe.study.spec import StudySpec, parse_study
from aipipe.wire import FeatureStats
from tests.hub_support import STUDY, Hub, Node, Round
from tests.test_cds_service import CLEVELAND, KEY, PID, ROOT, hook_request, prefetch_for
from tests.test_cds_service import records as records  # a fixture
from tests.test_hub_app import update

HEART = ROOT / "examples" / "heart-disease" / "study.yaml"
BASE = "https://cds.example.org/aipipe"
SERVICE = "fed-heart-disease-patient-view"
VERSION = "5eed" * 16


def heart_raw(**cds: Any) -> dict[str, Any]:
    raw: dict[str, Any] = yaml.safe_load(HEART.read_text())
    raw["secure"] = "none"
    raw["min_nodes"] = 2
    if cds:
        raw["cds"] = {**raw["cds"], **cds}
    return raw


def heart_spec(**cds: Any) -> StudySpec:
    return StudySpec.model_validate(heart_raw(**cds))


@dataclass(frozen=True)
class Site:
    store: NodeStore
    spec: StudySpec
    weights: dict[str, Any]

    def scorer(self, spec: StudySpec | None = None) -> PatientScorer:
        chosen = spec or self.spec
        return PatientScorer(
            chosen, self.weights, extract(self.store, chosen).preprocessor, VERSION
        )


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """Cleveland's patients in a node store and a fixed logistic model of the heart study."""
    spec = heart_spec()
    store = NodeStore.open(tmp_path_factory.mktemp("node") / "store.sqlite", KEY)
    ingest_files(store, [CLEVELAND])
    weights = weights_to_arrays(build_model(spec.model, len(spec.columns()), seed=3))
    yield Site(store, spec, dict(weights))
    store.close()


def router_client(*scorers: PatientScorer, **options: Any) -> TestClient:
    app = FastAPI()
    provider = StaticCdsProvider(list(scorers))
    app.include_router(cds_router(provider, audit=None, jwt=None, pseudonym_key=KEY,
                                  allow_unauthenticated=True, **options))  # fmt: skip
    return TestClient(app)


def card_of(client: TestClient, records: dict[str, Any], pid: str = PID) -> dict[str, Any]:
    body = hook_request(pid=pid, prefetch=prefetch_for(records, pid))
    response = client.post(f"/cds-services/{SERVICE}", json=body)
    assert response.status_code == 200, response.text
    (card,) = response.json()["cards"]
    assert isinstance(card, dict)
    return card


def path_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}"


# -- the cds: block ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cds", "message"),
    [
        ({"moderate_at": 0.8, "warning_at": 0.5}, "thresholds must rise"),
        ({"critical_at": 1.5}, "cds.critical_at"),
        ({"outcome_label": ""}, "cds.outcome_label"),
        ({"outcome_label": "x" * 81}, "cds.outcome_label"),
        ({"title": "t" * 101}, "cds.title"),
        ({"warning": 0.5}, "cds.warning"),
    ],
)
def test_a_bad_cds_block_is_a_clear_study_error(cds: dict[str, Any], message: str) -> None:
    raw = {**STUDY, "cds": cds}
    with pytest.raises(StudyError, match=message) as caught:
        parse_study(yaml.safe_dump(raw), source="study.yaml")
    assert "study.yaml is not a valid study" in str(caught.value)


def test_a_study_without_a_cds_block_keeps_its_digest_and_the_defaults() -> None:
    spec = StudySpec.model_validate(STUDY)
    # The digest the starting commit gave this study: nodes that approved it stay approved.
    assert spec.digest() == "a531823fd94dd3c35aa1d25a122a184b58be08304cd237ffb6a77e377af51d6b"
    assert spec.cds_settings().thresholds() == {
        "moderate_at": 0.3, "warning_at": 0.7, "critical_at": 0.9, "min_probability": 0.0,
    }  # fmt: skip
    assert StudySpec.model_validate({**STUDY, "cds": {}}).digest() != spec.digest()


def test_the_shipped_examples_name_their_outcome() -> None:
    for path, outcome in [
        (HEART, "Coronary artery disease"),
        (ROOT / "examples" / "synthea" / "study.yaml", "Type 2 diabetes"),
    ]:
        spec = parse_study(path.read_text())
        assert spec.cds is not None and spec.cds.outcome_label == outcome


def test_titles_and_summaries_use_the_outcome_display_not_the_slug(
    site: Site, records: dict[str, Any]
) -> None:
    client = router_client(site.scorer())
    services = client.get("/cds-services").json()["services"]
    card = card_of(client, records)

    titles = {s["title"] for s in services}
    assert titles == {"Coronary artery disease risk (angiographic)"}
    assert all("fed-heart-disease" not in s["title"] for s in services)
    assert card["summary"].startswith("Coronary artery disease risk ")
    resource = card["suggestions"][0]["actions"][0]["resource"]
    assert resource["prediction"][0]["outcome"]["text"] == "Coronary artery disease"
    # Without a block: the SNOMED code's display (44054006 is type 2 diabetes), never the slug.
    raw = {**STUDY, "name": "dm", "cohort": {"label": {"conditions": ["snomed|44054006"]}}}
    (entry, *_) = service_entries(StudySpec.model_validate(raw), VERSION)
    assert entry.title == "Type 2 diabetes risk"
    assert entry.source().outcome.display == "Type 2 diabetes"


def test_the_studys_thresholds_move_a_scores_level_and_indicator(
    site: Site, records: dict[str, Any]
) -> None:
    default = card_of(router_client(site.scorer()), records)
    p = default["suggestions"][0]["actions"][0]["resource"]["prediction"][0]["probabilityDecimal"]
    below = heart_spec(moderate_at=p / 3, warning_at=p / 2, critical_at=p * 0.9)
    above = heart_spec(moderate_at=min(1.0, p + 0.05), warning_at=1.0, critical_at=1.0)
    hidden = heart_spec(min_probability=min(1.0, p + 0.01))

    critical = card_of(router_client(site.scorer(below)), records)
    low = card_of(router_client(site.scorer(above)), records)
    response = router_client(site.scorer(hidden)).post(
        f"/cds-services/{SERVICE}", json=hook_request(prefetch=prefetch_for(records))
    )

    assert critical["indicator"] == "critical" and critical["summary"].endswith("(very high)")
    assert low["indicator"] == "info" and low["summary"].endswith("(low)")
    assert response.json() == {"cards": []}


def test_write_back_grades_and_names_by_the_studys_cds_block(site: Site) -> None:
    spec = heart_spec(outcome_label="CAD", moderate_at=0.0, warning_at=0.0, critical_at=0.0)
    now = datetime(2026, 1, 5, tzinfo=UTC)

    scored = [
        p for p in predict_cohort(site.store, spec, site.weights, VERSION, now=now)
        if p.assessment is not None
    ]  # fmt: skip

    assert scored and {p.level for p in scored} == {"very high"}
    outcomes = {p.assessment["prediction"][0]["outcome"]["text"] for p in scored if p.assessment}
    assert outcomes == {"CAD"}


# -- the model card ----------------------------------------------------------------------------


def test_without_a_base_url_the_link_is_the_requests_own_and_resolves(
    site: Site, records: dict[str, Any]
) -> None:
    client = router_client(site.scorer())
    card = card_of(client, records)

    url = card["source"]["url"]
    assert url == f"http://testserver/cds-services/{SERVICE}/model-card?version={VERSION}"
    assert [link["url"] for link in card["links"]] == [url]
    assert card["links"][0]["type"] == "absolute"
    model = client.get(path_of(url)).json()
    assert model["model_version"] == VERSION and model["lineage"] == [{"version": VERSION}]
    assert model["validation"] is None
    page = client.get(path_of(url), headers={"Accept": "text/html"})
    assert page.headers["content-type"].startswith("text/html")
    assert "not validated" in page.text and "Coronary artery disease" in page.text


@dataclass
class TrainedHub:
    hub: Hub
    study: dict[str, Any]
    versions: list[str]  # newest first: round 2, round 1, the initial weights
    nodes: list[Node]


@pytest.fixture
def trained_hub(tmp_path: Path) -> Iterator[TrainedHub]:
    """The hub with a configured CDS base URL, the heart study trained for two rounds by two
    nodes, and their (noise-free stand-in) statistics reported for hub-side scoring."""
    home = tmp_path / "hub"
    paths, token = init_hub(home, "cards-hub")
    config = yaml.safe_load((home / "hub.yaml").read_text())
    config |= {"cds_allow_unauthenticated": True, "cds_base_url": BASE}
    (home / "hub.yaml").write_text(yaml.safe_dump(config))
    with TestClient(create_app(load_hub(home))) as client:
        hub = Hub(client, paths, token)
        nodes = [hub.enrol("alpha"), hub.enrol("beta")]
        study = hub.publish(heart_raw())
        spec = StudySpec.model_validate(study["spec"])
        for _ in range(2):
            at: Round = hub.open_round(study)
            for node in nodes:
                assert hub.upload(node, at, update(node, at)).status_code == 200
        mean = np.array([54.0, 131.0, 246.0, 0.15, 150.0, 0.33, 1.0, 0.17, 0.28, 0.48,
                         0.01, 0.49, 0.68])  # fmt: skip
        assert len(mean) == len(spec.columns())
        n = 200.0
        stats = FeatureStats(study_digest=study["digest"], n=n, sums=list(mean * n),
                             squares=list((mean**2 + np.maximum(mean, 0.2)) * n))  # fmt: skip
        for node in nodes:
            response = client.post(
                f"/v1/studies/{study['name']}/stats",
                content=stats.model_dump_json(),
                headers={**node.headers, "Content-Type": "application/json"},
            )
            assert response.status_code == 200, response.text
        versions = [m["version"] for m in sorted(hub.models(study["name"]),
                                                 key=lambda m: -m["round"])]  # fmt: skip
        yield TrainedHub(hub, study, versions, nodes)


def test_a_hub_card_links_to_the_model_card_of_its_version_with_its_lineage(
    trained_hub: TrainedHub, records: dict[str, Any]
) -> None:
    client = trained_hub.hub.client
    newest, first, initial = trained_hub.versions
    card = card_of(client, records)

    url = f"{BASE}/cds-services/{SERVICE}/model-card?version={newest}"
    assert card["source"]["url"] == url
    assert [link["url"] for link in card["links"]] == [url]
    response = client.get(url.removeprefix(BASE))  # a proxy serves the hub under BASE
    assert response.status_code == 200, response.text
    model = response.json()
    assert model["model_version"] == newest and model["served_by"] == "hub"
    assert [(s["version"], s["round"]) for s in model["lineage"]] == [
        (newest, 2), (first, 1), (initial, 0),
    ]  # fmt: skip
    assert [s.get("parent") for s in model["lineage"]] == [first, initial, None]
    assert model["outcome"]["display"] == "Coronary artery disease"
    assert model["privacy"]["epsilon_per_site"] == 1.0 and model["secure"] == "none"
    assert model["thresholds"]["warning_at"] == 0.7 and model["validation"] is None
    assert [i["name"] for i in model["inputs"]][-2:] == ["restecg", "sex"]
    # An earlier version of the lineage still answers with its own card; an unknown one is 404.
    older = client.get(f"/cds-services/{SERVICE}/model-card", params={"version": first}).json()
    assert older["model_version"] == first and len(older["lineage"]) == 2
    unknown = client.get(f"/cds-services/{SERVICE}/model-card", params={"version": "f" * 64})
    assert unknown.status_code == 404


def test_the_node_serves_the_same_model_card_path_with_the_lineage_it_knows(
    trained_hub: TrainedHub, records: dict[str, Any], tmp_path: Path
) -> None:
    hub, study = trained_hub.hub, trained_hub.study
    alpha = trained_hub.nodes[0]
    paths = init_node(tmp_path / "alpha", "alpha")
    store, audit = open_store(paths), open_audit(paths)
    ingest_files(store, [CLEVELAND])
    store.approve(study["name"], study["digest"], json.dumps(study["spec"]))
    hub_client = HubClient("http://testserver", token=alpha.credential,
                           transport=hub.client._transport)  # fmt: skip
    try:
        app = node_cds_app(store, hub_client, [study["name"]], audit, pseudonym_key=KEY,
                           jwt=None, allow_unauthenticated=True)  # fmt: skip
        client = TestClient(app)
        card = card_of(client, records)
        url = card["source"]["url"]
        model = client.get(path_of(url)).json()
    finally:
        audit.close()
        store.close()

    newest = trained_hub.versions[0]
    assert url == f"http://testserver/cds-services/{SERVICE}/model-card?version={newest}"
    assert model["served_by"] == "node" and model["model_version"] == newest
    assert [s["version"] for s in model["lineage"]] == trained_hub.versions
    assert _audited(tmp_path / "alpha" / "audit.sqlite", "cds.model_card")


def _audited(path: Path, action: str) -> bool:
    with AuditLog.open(path, None) as log:
        return any(e.action == action for e in log.events())
