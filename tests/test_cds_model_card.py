"""Issue 11, item 7: cards read as a clinician expects. A study's `cds:` block names the outcome
and sets the thresholds; every card links (`source.url`, `links`) to the model card of the
version that scored it, served by the CDS router itself at the hub and at the node, with the
version's lineage, the study's DP setting, the inputs, the thresholds and (for now, empty)
validation. The real hub app (model registry, pooled statistics) and the node's serve-cds app,
in-process over ASGI."""

from __future__ import annotations

import json
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import numpy as np
import pytest
import yaml
from fastapi import FastAPI
from fastapi.testclient import TestClient

from aipipe.audit import AuditLog
from aipipe.cds import (
    JwtPolicy,
    LineageStep,
    PatientScorer,
    StaticCdsProvider,
    cds_router,
    service_entries,
)
from aipipe.cds.links import CardLinkSigner, load_link_key
from aipipe.errors import IdentityError, StudyError
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
from tests.cds_support import BASE as AUTH_BASE
from tests.cds_support import CLEVELAND, ISSUER, KEY, PID, ROOT, Signer, hook_request, prefetch_for
from tests.hub_support import STUDY, Hub, Node, Round, update

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

    url = card["source"]["url"]
    assert url.startswith(f"{BASE}/cds-services/{SERVICE}/model-card?version={newest}&")
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
                           jwt=None, allow_unauthenticated=True,
                           link_key=load_link_key(paths.cds_link_key))  # fmt: skip
        client = TestClient(app)
        card = card_of(client, records)
        url = card["source"]["url"]
        model = client.get(path_of(url)).json()
    finally:
        audit.close()
        store.close()

    newest = trained_hub.versions[0]
    assert url.startswith(f"http://testserver/cds-services/{SERVICE}/model-card?version={newest}&")
    assert stat.S_IMODE(paths.cds_link_key.stat().st_mode) == 0o600
    assert paths.cds_link_key.read_bytes() != paths.pseudonym_key.read_bytes()
    assert model["served_by"] == "node" and model["model_version"] == newest
    assert [s["version"] for s in model["lineage"]] == trained_hub.versions
    assert _audited(tmp_path / "alpha" / "audit.sqlite", "cds.model_card")


def _audited(path: Path, action: str) -> bool:
    with AuditLog.open(path, None) as log:
        return any(e.action == action for e in log.events())


def test_an_unscored_card_names_the_outcome_not_the_study_slug(
    site: Site, records: dict[str, Any]
) -> None:
    client = router_client(site.scorer())
    body = hook_request(prefetch=prefetch_for(records) | {"observations": None})
    response = client.post(f"/cds-services/{SERVICE}", json=body)

    (card,) = response.json()["cards"]
    assert card["indicator"] == "info"
    assert card["detail"].startswith("The Coronary artery disease risk model could not score")
    assert "fed-heart-disease" not in card["detail"]


# -- a card's link is a capability: it opens in a browser without a CDS client JWT ------------

LINK_KEY = b"model-card-link-key-for-tests-32"
LINEAGE = [LineageStep(VERSION, round=2, parent="a" * 64), LineageStep("a" * 64, round=1)]


@dataclass
class Clock:
    now: datetime


@dataclass
class Secured:
    client: TestClient
    clock: Clock
    audit: AuditLog
    signer: Signer

    def card(self, records: dict[str, Any], pid: str = PID) -> dict[str, Any]:
        endpoint = f"/cds-services/{SERVICE}"
        body = hook_request(pid=pid, prefetch=prefetch_for(records, pid))
        headers = {"Authorization": f"Bearer {self.signer.token(endpoint)}"}
        response = self.client.post(endpoint, json=body, headers=headers)
        assert response.status_code == 200, response.text
        (card,) = response.json()["cards"]
        assert isinstance(card, dict)
        return card

    def refusals(self) -> list[dict[str, Any]]:
        return [
            {"outcome": e.outcome, **e.details}
            for e in self.audit.events()
            if e.action == "auth.failure"
        ]


@pytest.fixture
def secured(site: Site, tmp_path: Path) -> Iterator[Secured]:
    """The router as an EHR meets it: every call needs a CDS client JWT; links are signed."""
    signer = Signer("ES384")
    policy = JwtPolicy({ISSUER: {"keys": [signer.jwk]}}, base_url=AUTH_BASE)
    clock = Clock(datetime(2026, 3, 1, 9, 0, tzinfo=UTC))
    provider = StaticCdsProvider([site.scorer()], lineages={site.spec.name: LINEAGE})
    with AuditLog.open(tmp_path / "audit.sqlite", None, owner="hub/test") as audit:
        app = FastAPI()
        app.include_router(cds_router(provider, audit=audit, jwt=policy, pseudonym_key=KEY,
                                      clock=lambda: clock.now, base_url=AUTH_BASE,
                                      link_key=LINK_KEY, link_lifetime_s=3600))  # fmt: skip
        yield Secured(TestClient(app), clock, audit, signer)


def with_query(url: str, **changes: str | None) -> str:
    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()} | changes
    kept = {k: v for k, v in query.items() if v is not None}
    return f"{parts.path}?{urlencode(kept)}"


def test_a_cards_link_opens_in_a_browser_without_a_token(
    secured: Secured, records: dict[str, Any]
) -> None:
    card = secured.card(records)
    url = card["source"]["url"]
    parts = urlsplit(url)
    query = parse_qs(parts.query)

    assert url.startswith(f"{AUTH_BASE}/cds-services/{SERVICE}/model-card?version={VERSION}&")
    assert query["expires"] == [str(int(secured.clock.now.timestamp()) + 3600)]
    assert len(query["sig"][0]) == 64
    page = secured.client.get(path_of(url), headers={"Accept": "text/html"})  # no JWT
    assert page.status_code == 200, page.text
    assert "Coronary artery disease" in page.text and "not validated" in page.text
    model = secured.client.get(path_of(url)).json()
    assert model["model_version"] == VERSION
    served = [e for e in secured.audit.events() if e.action == "cds.model_card"]
    assert len(served) == 2 and served[0].actor == "cds-link:model-card"
    # The link opens this one page: discovery and the card without a signature still need a JWT.
    assert secured.client.get("/cds-services").status_code == 401
    unsigned = secured.client.get(f"/cds-services/{SERVICE}/model-card?version={VERSION}")
    assert unsigned.status_code == 401
    token = secured.signer.token(f"/cds-services/{SERVICE}/model-card")
    with_jwt = secured.client.get(
        f"/cds-services/{SERVICE}/model-card", headers={"Authorization": f"Bearer {token}"}
    )
    assert with_jwt.status_code == 200 and with_jwt.json()["model_version"] == VERSION


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        ("another version of the lineage", "does not match"),
        ("a flipped signature", "does not match"),
        ("a later expiry", "does not match"),
        ("no signature", "lacks"),
        ("a signature that is not hex", "malformed"),
        ("expired", "expired"),
    ],
)
def test_a_tampered_or_expired_link_is_refused_and_audited(
    secured: Secured, records: dict[str, Any], tamper: str, reason: str
) -> None:
    url = secured.card(records)["source"]["url"]
    query = parse_qs(urlsplit(url).query)
    sig, expires = query["sig"][0], int(query["expires"][0])
    flipped = ("0" if sig[0] != "0" else "1") + sig[1:]
    changed = {
        "another version of the lineage": with_query(url, version="a" * 64),
        "a flipped signature": with_query(url, sig=flipped),
        "a later expiry": with_query(url, expires=str(expires + 86_400)),
        "no signature": with_query(url, sig=None),
        "a signature that is not hex": with_query(url, sig="z" * 64),
        "expired": path_of(url),
    }[tamper]
    if tamper == "expired":
        secured.clock.now = datetime.fromtimestamp(expires, UTC)

    response = secured.client.get(changed, headers={"Accept": "text/html"})

    assert response.status_code == 401, response.text
    assert reason in response.json()["issue"][0]["diagnostics"]
    (refusal,) = secured.refusals()
    assert refusal["outcome"] == "refused" and refusal["status"] == 401
    assert reason in refusal["reason"] and sig not in json.dumps(refusal)
    # The untouched link still opens (until it expires).
    if tamper != "expired":
        assert secured.client.get(path_of(url)).status_code == 200


def test_a_link_carries_no_patient_data(secured: Secured, records: dict[str, Any]) -> None:
    first, second = sorted(p for p in records if p != PID)[:2]
    cards = [secured.card(records, pid) for pid in (PID, first, second)]
    urls = {link["url"] for card in cards for link in card["links"]}
    urls |= {card["source"]["url"] for card in cards}

    (url,) = urls  # the same link for every patient scored by the version at that time
    assert set(parse_qs(urlsplit(url).query)) == {"version", "expires", "sig"}
    for pid in (PID, first, second):
        assert pid not in url
    for event in secured.audit.events():
        if event.resource.startswith("patient:"):  # the audit pseudonym is not in it either
            assert event.resource.removeprefix("patient:") not in url


def test_the_hub_signs_links_with_its_own_private_key_file(
    trained_hub: TrainedHub, records: dict[str, Any]
) -> None:
    hub = trained_hub.hub
    key = hub.paths.home / "cds-link.key"
    url = card_of(hub.client, records)["source"]["url"]

    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and len(key.read_bytes()) == 32
    query = {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}
    assert set(query) == {"version", "expires", "sig"}
    assert abs(int(query["expires"]) - (time.time() + 86_400)) < 120  # the default: 24 h
    assert hub.client.get(url.removeprefix(BASE)).status_code == 200
    forged = with_query(url.removeprefix(BASE), version=trained_hub.versions[1])
    assert hub.client.get(forged).status_code == 401  # refused even on a loopback opt-out
    # Signed with the key in the file (what a restarted hub reads again).
    signer = CardLinkSigner(key.read_bytes())
    opened = signer.verify(SERVICE, query["version"], query["expires"], query["sig"],
                           datetime.now(UTC))  # fmt: skip
    assert opened == int(query["expires"])


def test_the_link_key_is_its_own_private_file_and_not_the_pseudonym_key(
    site: Site, tmp_path: Path
) -> None:
    path = tmp_path / "cds-link.key"
    key = load_link_key(path)

    assert load_link_key(path) == key and len(key) == 32
    assert [p.name for p in tmp_path.iterdir()] == ["cds-link.key"]  # no spare file left
    path.chmod(0o644)
    with pytest.raises(IdentityError, match="readable by others"):
        load_link_key(path)
    with pytest.raises(ValueError, match="not be the pseudonym key"):
        cds_router(StaticCdsProvider([site.scorer()]), audit=None, jwt=None, pseudonym_key=KEY,
                   link_key=KEY)  # fmt: skip
