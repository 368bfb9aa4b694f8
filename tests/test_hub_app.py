"""The hub's HTTP API in-process (`tests/hub_support.py`): enrolment, studies, plaintext rounds.

Updates are framed and signed like `aipipe/node/worker.py` does (`tests/e2e_support.py`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from fastapi.testclient import TestClient
from httpx import Response

from aipipe.audit.log import AuditLog
from aipipe.hub.app import create_app
from aipipe.hub.home import init_hub
from aipipe.secure.identity import Identity
from aipipe.study.spec import load_study
from aipipe.wire.frames import MEDIA_TYPE
from tests.e2e_support import wait_until
from tests.hub_support import Hub, Node, Round, enrol_request, update

V1_ROUTES = {
    "/v1/enrol",
    "/v1/nodes",
    "/v1/keyring",
    "/v1/studies",
    "/v1/studies/{study}",
    "/v1/studies/{study}/rounds",
    "/v1/studies/{study}/rounds/{number}",
    "/v1/studies/{study}/rounds/{number}/updates",
    "/v1/studies/{study}/rounds/{number}/decline",
    "/v1/studies/{study}/rounds/{number}/secagg/config",
    "/v1/studies/{study}/rounds/{number}/secagg/{step}",
    "/v1/studies/{study}/ckks/keys",
    "/v1/studies/{study}/rounds/{number}/ckks/sum",
    "/v1/studies/{study}/rounds/{number}/ckks/decrypted",
    "/v1/work",
    "/v1/models",
    "/v1/models/{version}",
    "/v1/models/{version}/weights",
    "/v1/models/{version}/metrics",
}


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Hub]:
    paths, token = init_hub(tmp_path / "hub", "test-hub")
    with TestClient(create_app(paths)) as client:
        yield Hub(client, paths, token)


@pytest.fixture
def open_round(hub: Hub, pair: tuple[Node, Node]) -> Round:
    return hub.open_round(hub.publish())


# -- health, auth, enrolment ------------------------------------------------------------------


def test_healthz_answers_ok_without_credentials(hub: Hub) -> None:
    response = hub.client.get("/healthz")

    assert response.status_code == 200
    assert response.json()["status"] == "ok"


def test_listing_nodes_without_a_token_is_unauthorised(hub: Hub) -> None:
    response = hub.client.get("/v1/nodes")

    assert response.status_code == 401


def test_listing_nodes_with_a_node_credential_is_forbidden_and_audited(hub: Hub) -> None:
    node = hub.enrol("alpha")

    response = hub.client.get("/v1/nodes", headers=node.headers)

    assert response.status_code == 403
    assert "needs the role admin or auditor or scientist" in response.json()["detail"]
    assert [e.resource for e in hub.events("auth.refused")] == ["GET /v1/nodes"]


def test_listing_nodes_with_the_admin_token_shows_the_enrolled_nodes(hub: Hub) -> None:
    alpha = hub.enrol("alpha")

    response = hub.client.get("/v1/nodes", headers=hub.admin)

    assert response.status_code == 200
    assert [(n["name"], n["public_key"]) for n in response.json()] == [
        ("alpha", alpha.identity.public_hex)
    ]


def test_an_enrolment_token_enrols_its_node(hub: Hub) -> None:
    identity = Identity.generate()

    response = hub.enrol_request(hub.issue_token("alpha"), identity)

    assert response.status_code == 200
    body = response.json()
    assert body["node"] == "alpha"
    assert body["hub_public_key"] == Identity.load(hub.paths.identity_key).public_hex
    as_node = {"Authorization": f"Bearer {body['credential']}"}
    assert hub.client.get("/v1/work", headers=as_node).status_code == 200


def test_an_enrolment_token_cannot_be_used_twice(hub: Hub) -> None:
    token = hub.issue_token("alpha")
    first = hub.enrol_request(token, Identity.generate())

    again = hub.enrol_request(token, Identity.generate())

    assert first.status_code == 200
    assert again.status_code == 401
    assert "invalid or already used" in again.json()["detail"]


def test_a_sealing_key_not_signed_by_the_node_is_refused_and_the_token_stays_usable(
    hub: Hub,
) -> None:
    token = hub.issue_token("alpha")
    identity, sealing = Identity.generate(), X25519PrivateKey.generate()
    honest = enrol_request(token, identity, sealing)
    signed_by_another = enrol_request(token, Identity.generate(), sealing).sealing_signature
    forged = honest.model_copy(update={"sealing_signature": signed_by_another})

    refused = hub.client.post("/v1/enrol", json=forged.model_dump())
    accepted = hub.client.post("/v1/enrol", json=honest.model_dump())

    assert refused.status_code == 401
    assert "not signed by the node's identity key" in refused.json()["detail"]
    assert accepted.status_code == 200


# -- studies and rounds -----------------------------------------------------------------------


def test_publishing_a_study_creates_model_version_zero(hub: Hub) -> None:
    study = hub.publish()

    model = hub.client.get(f"/v1/models/{study['current_version']}", headers=hub.admin).json()

    assert study["rounds_closed"] == 0
    assert (model["study"], model["round"], model["parent"]) == ("hub-test", 0, None)
    assert model["contributors"] == []


def test_opening_a_round_with_too_few_nodes_is_a_conflict(hub: Hub) -> None:
    hub.enrol("alpha")
    hub.publish()

    response = hub.post_round()

    assert response.status_code == 409
    assert "needs 2 nodes but 1 are eligible" in response.json()["detail"]


def test_opening_a_second_round_while_one_is_open_is_a_conflict(
    hub: Hub, open_round: Round
) -> None:
    response = hub.post_round()

    assert response.status_code == 409
    assert "round 1 of 'hub-test' is still open" in response.json()["detail"]


def test_a_selected_node_is_offered_training_for_the_open_round(
    hub: Hub, pair: tuple[Node, Node], open_round: Round
) -> None:
    response = hub.client.get("/v1/work", headers=pair[0].headers)

    assert response.status_code == 200
    work = response.json()
    assert (work["kind"], work["study"], work["round"], work["version"]) == (
        "train",
        "hub-test",
        open_round.number,
        open_round.base_version,
    )


# -- uploads ----------------------------------------------------------------------------------


def test_an_upload_with_a_wrong_content_type_is_refused(
    hub: Hub, pair: tuple[Node, Node], open_round: Round
) -> None:
    body = update(pair[0], open_round)

    response = hub.upload(pair[0], open_round, body, content_type="application/octet-stream")

    assert response.status_code == 409
    assert response.json()["detail"] == f"updates are sent as {MEDIA_TYPE}"


def _malformed(node: Node, at: Round) -> tuple[bytes, str]:
    return b"PK\x03\x04 not a frame", "malformed update: body is not an aipipe frame (bad magic)"


def _unsigned(node: Node, at: Round) -> tuple[bytes, str]:
    return update(node, at, signed=False), "update is not signed"


def _signed_by_another_key(node: Node, at: Round) -> tuple[bytes, str]:
    body = update(node, at, signer=Identity.generate())
    return body, "update signature does not verify with the node's key"


def _on_another_base_version(node: Node, at: Round) -> tuple[bytes, str]:
    other = hashlib.sha256(b"another model").hexdigest()
    reason = (
        f"update was trained on {other[:12]} but round {at.number} started from "
        f"{at.base_version[:12]}"
    )
    return update(node, at, base_version=other), reason


def _with_wrong_shapes(node: Node, at: Round) -> tuple[bytes, str]:
    key = sorted(at.base)[0]
    expected = at.base[key].shape
    wrong = (*expected[:-1], expected[-1] + 1)
    delta = {**{k: np.zeros_like(v) for k, v in at.base.items()}, key: np.zeros(wrong, np.float32)}
    return update(node, at, delta), f"tensor '{key}' has shape {wrong}, expected {expected}"


def _with_nan(node: Node, at: Round) -> tuple[bytes, str]:
    key = sorted(at.base)[-1]
    poisoned = np.zeros_like(at.base[key])
    poisoned.flat[0] = np.nan
    delta = {**{k: np.zeros_like(v) for k, v in at.base.items()}, key: poisoned}
    return update(node, at, delta), f"tensor '{key}' holds NaN or infinity"


BadUpdate = Callable[[Node, Round], tuple[bytes, str]]


@pytest.mark.parametrize(
    "bad",
    [
        _malformed,
        _unsigned,
        _signed_by_another_key,
        _on_another_base_version,
        _with_wrong_shapes,
        _with_nan,
    ],
    ids=lambda bad: bad.__name__.strip("_"),
)
def test_a_bad_upload_is_refused_with_its_reason(
    hub: Hub, pair: tuple[Node, Node], open_round: Round, bad: BadUpdate
) -> None:
    body, reason = bad(pair[0], open_round)

    response = hub.upload(pair[0], open_round, body)

    assert response.status_code == 409
    assert response.json()["detail"] == reason


def test_a_refused_upload_leaves_the_round_waiting_for_the_node(
    hub: Hub, pair: tuple[Node, Node], open_round: Round
) -> None:
    refused = hub.upload(pair[0], open_round, _with_nan(pair[0], open_round)[0])

    accepted = hub.upload(pair[0], open_round, update(pair[0], open_round))

    assert refused.status_code == 409
    assert accepted.status_code == 200, accepted.text
    assert hub.round(open_round)["reported"] == ["alpha"]


def test_a_valid_upload_is_accepted_and_the_round_collects(
    hub: Hub, pair: tuple[Node, Node], open_round: Round
) -> None:
    response = hub.upload(pair[0], open_round, update(pair[0], open_round))

    assert response.status_code == 200, response.text
    assert response.json() == {"accepted": True, "round_state": "collecting", "reason": None}
    assert hub.round(open_round)["reported"] == ["alpha"]


def test_a_round_closes_once_every_selected_node_reported(
    hub: Hub, pair: tuple[Node, Node], open_round: Round
) -> None:
    states = [
        hub.upload(node, open_round, update(node, open_round)).json()["round_state"]
        for node in pair
    ]

    info = hub.round(open_round)

    assert states == ["collecting", "closed"]
    assert info["state"] == "closed"
    assert info["result_version"] is not None


def test_the_closed_rounds_model_is_the_fedavg_of_the_deltas_sent(
    hub: Hub, pair: tuple[Node, Node], open_round: Round
) -> None:
    rng = np.random.default_rng(7)
    counts = {"alpha": 12, "beta": 36}
    deltas = {
        node.name: {
            k: rng.normal(0, 0.5, v.shape).astype(v.dtype) for k, v in open_round.base.items()
        }
        for node in pair
    }
    for node in pair:
        response = hub.upload(
            node, open_round, update(node, open_round, deltas[node.name], n=counts[node.name])
        )
        assert response.status_code == 200, response.text

    weights = hub.weights(hub.round(open_round)["result_version"])

    total = sum(counts.values())
    for key, base in open_round.base.items():
        mean = sum(counts[name] * deltas[name][key].astype(np.float64) for name in counts) / total
        expected = (base.astype(np.float64) + mean).astype(base.dtype)
        np.testing.assert_allclose(weights[key], expected, rtol=1e-6, atol=1e-7)
        assert not np.allclose(weights[key], base)


def decline(hub: Hub, node: Node, at: Round, reason: str, *, exclude: bool) -> Response:
    response: Response = hub.client.post(
        f"/v1/studies/{at.study}/rounds/{at.number}/decline",
        json={"reason": reason, "exclude": exclude},
        headers=node.headers,
    )
    return response


def test_a_node_that_declines_with_exclude_is_left_out_of_the_next_round(hub: Hub) -> None:
    alpha, beta, gamma = hub.enrol("alpha"), hub.enrol("beta"), hub.enrol("gamma")
    first = hub.open_round(hub.publish())
    declined = decline(hub, gamma, first, "privacy budget spent", exclude=True)
    for node in (alpha, beta):
        assert hub.upload(node, first, update(node, first)).status_code == 200

    second = hub.post_round()

    assert declined.status_code == 200
    assert hub.round(first)["declined"] == {"gamma": "privacy budget spent"}
    assert second.status_code == 200, second.text
    assert second.json()["selected"] == ["alpha", "beta"]


def test_declining_a_round_that_already_closed_is_a_conflict(hub: Hub) -> None:
    alpha, beta, gamma = hub.enrol("alpha"), hub.enrol("beta"), hub.enrol("gamma")
    at = hub.open_round(hub.publish(), deadline_s=0.5)
    for node in (alpha, beta):
        assert hub.upload(node, at, update(node, at)).status_code == 200
    wait_until(lambda: hub.round(at)["state"] == "closed", what="the deadline tick", timeout_s=10)

    response = decline(hub, gamma, at, "too late", exclude=False)

    assert response.status_code == 409
    assert hub.round(at)["declined"] == {}


def test_an_update_arriving_after_the_deadline_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("aipipe.hub.app.TICK_S", 3600.0)  # no tick between deadline and upload
    paths, token = init_hub(tmp_path / "hub", "test-hub")
    with TestClient(create_app(paths)) as client:
        hub = Hub(client, paths, token)
        alpha, _ = hub.enrol("alpha"), hub.enrol("beta")
        at = hub.open_round(hub.publish(), deadline_s=0.05)
        deadline = datetime.fromisoformat(hub.round(at)["deadline"].replace("Z", "+00:00"))
        wait_until(lambda: datetime.now(UTC) > deadline, what="the round's deadline", timeout_s=5)

        response = hub.upload(alpha, at, update(alpha, at))

    assert response.status_code == 409, response.json()


def test_an_upload_refused_for_its_content_type_is_audited(
    hub: Hub, pair: tuple[Node, Node], open_round: Round
) -> None:
    hub.upload(pair[0], open_round, update(pair[0], open_round), content_type="text/plain")

    with AuditLog.open(hub.paths.audit_log, None) as log:
        refused = [e for e in log.events() if e.action == "update.refused"]

    assert [e.actor for e in refused] == ["alpha"]


# -- operations -------------------------------------------------------------------------------


def test_metrics_are_prometheus_text_with_the_node_count(hub: Hub, pair: tuple[Node, Node]) -> None:
    response = hub.client.get("/metrics", headers=hub.admin)

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    lines = response.text.splitlines()
    assert "# TYPE aipipe_nodes gauge" in lines
    assert 'aipipe_nodes{state="active"} 2.0' in lines


def test_openapi_lists_every_v1_route(hub: Hub) -> None:
    response = hub.client.get("/openapi.json", headers=hub.admin)

    assert response.status_code == 200
    assert set(response.json()["paths"]) >= V1_ROUTES


def test_a_secure_study_with_fewer_than_three_nodes_is_refused_at_publish(
    tmp_path: Path,
) -> None:
    paths, token = init_hub(tmp_path / "hub", "h")
    spec = load_study(Path(__file__).resolve().parents[1] / "examples/heart-disease/study.yaml")
    raw = {**spec.model_dump(mode="json"), "name": "secure-heart", "secure": "secagg",
           "min_nodes": 2}  # fmt: skip

    with TestClient(create_app(paths)) as client:
        response = client.post("/v1/studies", json={"spec": raw},
                               headers={"Authorization": f"Bearer {token}"})  # fmt: skip

    assert response.status_code == 422
    assert "min_nodes ≥ 3" in response.json()["detail"]
