"""The hub's Prometheus metrics (`aipipe.hub.metrics`) and its probes, /healthz and /readyz.

A real round runs in-process over HTTP (two nodes, one update refused for its signature); the
exposition is read back with prometheus_client's own text parser, family by family.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from aipipe.hub.metrics import REFUSAL_CATEGORIES
from tests.hub_support import STUDY, Hub, running_hub, update

EPSILON = {"alpha": 0.75, "bravo": 1.25}


def samples(hub: Hub) -> dict[str, list[Sample]]:
    """Every family of the hub's /metrics, by name, parsed by prometheus_client."""
    response = hub.client.get("/metrics", headers=hub.admin)
    assert response.status_code == 200, response.text
    return {f.name: f.samples for f in text_string_to_metric_families(response.text)}


def value(families: dict[str, list[Sample]], name: str, **labels: str) -> float:
    """The value of the sample `name` with exactly these labels."""
    family = name.removesuffix("_total").removesuffix("_count").removesuffix("_sum")
    found = [s.value for s in families[family] if s.name == name and s.labels == labels]
    assert len(found) == 1, (name, labels, families[family])
    return found[0]


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Hub]:
    with running_hub(tmp_path / "hub") as hub:
        yield hub


@pytest.fixture
def ran(hub: Hub) -> Hub:
    """One closed round: alpha's update accepted, bravo's refused once (signed with alpha's
    key), then bravo's accepted."""
    alpha, bravo = hub.enrol("alpha"), hub.enrol("bravo")
    at = hub.open_round(hub.publish())
    assert hub.upload(alpha, at, update(alpha, at, epsilon=EPSILON["alpha"])).is_success
    forged = hub.upload(bravo, at, update(bravo, at, epsilon=9.0, signer=alpha.identity))
    assert forged.status_code == 409, forged.text
    assert hub.upload(bravo, at, update(bravo, at, epsilon=EPSILON["bravo"])).is_success
    assert hub.round(at)["state"] == "closed"
    return hub


# -- the store's counts -----------------------------------------------------------------------


def test_a_round_shows_in_the_store_families(ran: Hub) -> None:
    families = samples(ran)

    assert value(families, "aipipe_nodes", state="active") == 2
    assert value(families, "aipipe_rounds", state="closed") == 1
    assert value(families, "aipipe_updates_accepted_total") == 2
    assert value(families, "aipipe_model_versions", study=STUDY["name"]) == 2  # init + round 1
    assert families["aipipe_rounds_open"] == []  # nothing is taking updates any more
    assert families["aipipe_round_nodes_awaited"] == []


def test_epsilon_per_site_is_what_the_plaintext_headers_stated(ran: Hub) -> None:
    families = samples(ran)

    for site, epsilon in EPSILON.items():
        assert value(families, "aipipe_epsilon_spent", study=STUDY["name"], site=site) == epsilon
    assert len(families["aipipe_epsilon_spent"]) == 2  # the refused header's 9.0 is not there


def test_queue_depths_count_open_rounds_and_the_nodes_they_await(hub: Hub) -> None:
    alpha, _ = hub.enrol("alpha"), hub.enrol("bravo")
    at = hub.open_round(hub.publish())
    assert hub.upload(alpha, at, update(alpha, at, epsilon=0.5)).is_success

    families = samples(hub)

    assert value(families, "aipipe_rounds_open", study=STUDY["name"]) == 1
    awaited = {"study": STUDY["name"], "round": str(at.number)}
    assert value(families, "aipipe_round_nodes_awaited", **awaited) == 1


# -- this process's observations --------------------------------------------------------------


def test_a_refused_update_counts_under_its_category_only(ran: Hub) -> None:
    families = samples(ran)

    assert value(families, "aipipe_updates_refused_total", category="signature") == 1
    others = [c for c in REFUSAL_CATEGORIES if c != "signature"]
    assert all(value(families, "aipipe_updates_refused_total", category=c) == 0 for c in others)


def test_the_hubs_own_refusals_land_in_their_categories(hub: Hub) -> None:
    alpha, _ = hub.enrol("alpha"), hub.enrol("bravo")
    at = hub.open_round(hub.publish())
    good = update(alpha, at)
    refused = {
        "signature": hub.upload(alpha, at, update(alpha, at, signed=False)),
        "bounds": hub.upload(alpha, at, update(alpha, at, n=10**6)),
        "stale": hub.upload(alpha, at, update(alpha, at, base_version="0" * 64)),
        "malformed": hub.upload(alpha, at, good, content_type="application/json"),
    }
    assert hub.upload(alpha, at, good).is_success
    refused["duplicate"] = hub.upload(alpha, at, good)
    assert all(r.status_code == 409 for r in refused.values()), [r.text for r in refused.values()]

    families = samples(hub)

    for category in REFUSAL_CATEGORIES:
        expected = 0 if category == "protocol" else 1
        assert value(families, "aipipe_updates_refused_total", category=category) == expected
    audited = [e.details["category"] for e in hub.events("update.refused")]
    assert audited == list(refused)  # the category is typed where the refusal is raised


def test_a_concluded_round_observes_each_stage_once(ran: Hub) -> None:
    families = samples(ran)

    for stage in ("collecting", "aggregating"):
        name = "aipipe_round_stage_duration_seconds_count"
        assert value(families, name, stage=stage) == 1
        assert value(families, "aipipe_round_stage_duration_seconds_sum", stage=stage) >= 0


def test_hub_cds_requests_are_timed_by_route_hook_and_outcome(hub: Hub) -> None:
    hub.client.get("/cds-services")  # no client JWT: refused
    hub.client.post("/cds-services/hub-test-patient-view", json={"hook": "patient-view"})
    hub.client.post("/cds-services/made-up-id", json={})

    families = samples(hub)

    name = "aipipe_cds_request_duration_seconds_count"
    assert value(families, name, route="discovery", hook="none", outcome="refused") == 1
    assert value(families, name, route="call", hook="patient-view", outcome="refused") == 1
    assert value(families, name, route="call", hook="unknown", outcome="refused") == 1


def test_two_apps_in_one_process_do_not_share_counters(ran: Hub, tmp_path: Path) -> None:
    ran.client.get("/cds-services")

    with running_hub(tmp_path / "other") as other:
        families = samples(other)

    assert all(s.value == 0 for s in families["aipipe_updates_refused"] if s.name.endswith("total"))
    assert not [s for s in families["aipipe_round_stage_duration_seconds"] if s.value]
    assert not [s for s in families["aipipe_cds_request_duration_seconds"] if s.value]
    assert value(samples(ran), "aipipe_updates_refused_total", category="signature") == 1


def test_the_exposition_carries_no_reason_text_token_or_patient(ran: Hub) -> None:
    patient = "Patient/metrics-test-4711"
    ran.client.post(
        "/cds-services/hub-test-patient-view",
        json={"hook": "patient-view", "context": {"patientId": patient}},
    )

    text = ran.client.get("/metrics", headers=ran.admin).text

    for secret in ("does not verify", "signature does", patient, "4711", ran.admin_token):
        assert secret not in text
    assert "alpha" in text  # a node's name is the one node-level detail (ε per site)


def test_metrics_need_the_admin_token_and_speak_the_text_format(ran: Hub) -> None:
    assert ran.client.get("/metrics").status_code == 401
    scraped = ran.client.get("/metrics", headers=ran.admin)
    assert scraped.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"


# -- probes -----------------------------------------------------------------------------------


def test_healthz_is_a_cheap_liveness_answer(hub: Hub) -> None:
    assert hub.client.get("/healthz").json()["status"] == "ok"


def test_readyz_answers_503_with_a_reason_once_the_store_cannot_answer(hub: Hub) -> None:
    ready = hub.client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["status"] == "ready"

    hub.client.app.state.service.store.close()  # type: ignore[attr-defined]
    broken = hub.client.get("/readyz")

    assert broken.status_code == 503
    assert broken.json()["status"] == "unready"
    assert "store" in broken.json()["reason"]
    assert hub.client.get("/healthz").status_code == 200  # alive, just not ready


def test_readyz_answers_503_once_the_audit_log_is_closed(hub: Hub) -> None:
    hub.client.app.state.audit.close()  # type: ignore[attr-defined]

    broken = hub.client.get("/readyz")

    assert broken.status_code == 503
    assert "audit log" in broken.json()["reason"]


def test_both_probes_are_in_the_openapi(hub: Hub) -> None:
    paths = hub.client.get("/openapi.json", headers=hub.admin).json()["paths"]

    assert "/healthz" in paths
    assert set(paths["/readyz"]["get"]["responses"]) >= {"200", "503"}
