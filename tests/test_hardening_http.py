"""Issue 9, the hub's HTTP layer: body limits before the body is read (3), integer overflow
(14), blob integrity (15), what is public (18) and documented error responses (19)."""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from aipipe.hub.app import create_app
from aipipe.hub.home import init_hub
from aipipe.hub.limits import MAX_ENROL_BYTES, MAX_UPDATE_BYTES, rule_for
from aipipe.hub.routes import route_table
from aipipe.wire.frames import MEDIA_TYPE
from tests.e2e_support import frame, sign, signed_update
from tests.hub_support import Hub, Node, Round, running_hub
from tests.live_server import serving, status_after_head

MiB = 1024 * 1024


@pytest.fixture
def open_round(hub: Hub) -> tuple[Node, Round]:
    alpha = hub.enrol("alpha")
    hub.enrol("beta")
    return alpha, hub.open_round(hub.publish())


def _head(path: str, length: int, token: str | None = None) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: hub", "Content-Type: application/json"]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    return ("\r\n".join([*lines, f"Content-Length: {length}"]) + "\r\n\r\n").encode()


# -- 3: authenticate first, cap every body before reading it -----------------------------------


def test_an_unauthenticated_200_mib_study_is_refused_401_before_its_body_is_read(
    tmp_path: Path,
) -> None:
    paths, _ = init_hub(tmp_path / "hub", "h")
    with serving(create_app(paths)) as port:
        status = status_after_head(port, _head("/v1/studies", 200 * MiB))

    assert status == 401


def test_a_200_mib_enrolment_is_refused_413_before_its_body_is_read(tmp_path: Path) -> None:
    paths, _ = init_hub(tmp_path / "hub", "h")
    with serving(create_app(paths)) as port:
        status = status_after_head(port, _head("/v1/enrol", 200 * MiB))

    assert status == 413


def test_every_route_taking_a_body_refuses_one_over_its_cap_before_reading_it(
    tmp_path: Path,
) -> None:
    """Each POST route of the route table (a new one included as soon as it exists), with a
    valid token: a declared Content-Length one byte over the route's cap is answered 413 at
    once (the guard authenticates, then caps, before a handler or a role check runs)."""
    paths, token = init_hub(tmp_path / "hub", "h")
    posts = sorted({row.path for row in route_table() if row.method == "POST"})
    concrete = [re.sub(r"\{\w+\}", "x", path) for path in posts]
    with serving(create_app(paths)) as port:
        statuses = {
            path: status_after_head(port, _head(path, rule_for(path).cap + 1, token))
            for path in concrete
        }

    assert len(statuses) >= 15
    assert statuses == dict.fromkeys(concrete, 413)


def test_a_chunked_enrolment_is_cut_off_at_its_cap_with_413(tmp_path: Path) -> None:
    paths, _ = init_hub(tmp_path / "hub", "h")
    sent = 0

    def chunks() -> Iterator[bytes]:  # no Content-Length: the server must count
        nonlocal sent
        for _ in range(64):
            sent += 64 * 1024
            yield b" " * (64 * 1024)

    with serving(create_app(paths)) as port:
        try:
            status = httpx.post(f"http://127.0.0.1:{port}/v1/enrol", content=chunks()).status_code
        except httpx.TransportError:  # the hub closed the connection while we still sent
            status = 413

    assert status == 413
    assert 4 * MiB > MAX_ENROL_BYTES


def test_an_update_over_the_cap_is_refused_413_before_it_is_buffered(
    tmp_path: Path,
) -> None:
    with running_hub(tmp_path / "hub") as hub:
        alpha = hub.enrol("alpha")
        hub.enrol("beta")
        at = hub.open_round(hub.publish())
    with serving(create_app(hub.paths)) as port:
        head = _head(f"{at.path}/updates", MAX_UPDATE_BYTES + 1, alpha.credential)
        status = status_after_head(port, head.replace(b"application/json", MEDIA_TYPE.encode()))

    assert status == 413


def test_a_small_body_with_a_bad_token_is_refused_401(hub: Hub) -> None:
    response = hub.client.post(
        "/v1/studies", json={"spec": {}}, headers={"Authorization": "Bearer nope"}
    )

    assert response.status_code == 401


# -- 14: integers that overflow -------------------------------------------------------------------


def test_a_round_number_of_10_to_the_23_is_refused_422_not_a_server_error(hub: Hub) -> None:
    hub.publish()

    response = hub.client.get(f"/v1/studies/hub-test/rounds/{10**23}", headers=hub.admin)

    assert response.status_code == 422
    assert "number" in response.json()["detail"]


def test_an_update_claiming_2_to_the_64_examples_is_refused_and_audited(
    hub: Hub, open_round: tuple[Node, Round]
) -> None:
    alpha, at = open_round
    delta = {k: np.full_like(v, 0.01) for k, v in at.base.items()}
    header, payload = signed_update(
        alpha.identity, node="alpha", study=at.study, study_digest=at.digest,
        round=at.number, base_version=at.base_version, delta=delta,
    )  # fmt: skip
    header = sign(alpha.identity, header.model_copy(update={"num_examples": 2**64}))

    response = hub.upload(alpha, at, frame(header, payload))

    assert response.status_code == 409
    assert "num_examples" in response.json()["detail"]
    assert [e.actor for e in hub.events("update.refused")] == ["alpha"]


# -- 15: blobs are checked against their address ------------------------------------------------


def _weights_blob(hub: Hub, version: str) -> Path:
    store = hub.paths.open_store()
    try:
        row = store.model(version)
        assert row is not None
        digest = str(row["blob"])
    finally:
        store.close()
    return hub.paths.blobs / digest[:2] / digest


def test_a_damaged_blob_is_not_served(hub: Hub, open_round: tuple[Node, Round]) -> None:
    _, at = open_round
    blob = _weights_blob(hub, at.base_version)
    blob.write_bytes(blob.read_bytes()[:-1] + b"\x00")

    response = hub.client.get(f"/v1/models/{at.base_version}/weights", headers=hub.admin)

    assert response.status_code == 500
    assert "damaged" in response.json()["detail"]


def test_a_missing_blob_is_reported_without_the_servers_path(
    hub: Hub, open_round: tuple[Node, Round]
) -> None:
    _, at = open_round
    _weights_blob(hub, at.base_version).unlink()

    response = hub.client.get(f"/v1/models/{at.base_version}/weights", headers=hub.admin)

    assert response.status_code == 500
    assert "missing" in response.json()["detail"]
    assert str(hub.paths.home) not in response.text


# -- 18: what is public -------------------------------------------------------------------------


def test_metrics_need_a_monitoring_role(hub: Hub) -> None:
    node = hub.enrol("alpha")

    assert hub.client.get("/metrics").status_code == 401
    assert hub.client.get("/metrics", headers=node.headers).status_code == 403
    assert hub.client.get("/metrics", headers=hub.admin).status_code == 200


def test_the_api_description_needs_the_admin_token_and_docs_are_off_by_default(hub: Hub) -> None:
    assert hub.client.get("/openapi.json").status_code == 401
    assert hub.client.get("/openapi.json", headers=hub.admin).status_code == 200
    assert hub.client.get("/docs").status_code == 404
    assert hub.client.get("/healthz").status_code == 200


def test_with_api_docs_the_docs_page_loads_its_assets_from_the_hub(tmp_path: Path) -> None:
    paths, _ = init_hub(tmp_path / "hub", "h")
    paths.config = paths.config.model_copy(update={"api_docs": True})

    with TestClient(create_app(paths)) as client:
        page = client.get("/docs")
        script = client.get("/docs/assets/swagger-ui-bundle.js")
        schema = client.get("/openapi.json")

    assert page.status_code == 200
    assert "https://" not in page.text and "http://" not in page.text
    assert "/docs/assets/swagger-ui-bundle.js" in page.text
    assert script.status_code == 200 and len(script.content) > 100_000
    assert schema.status_code == 200


# -- 19: documented errors and schema drift ------------------------------------------------------


def test_rounds_of_a_missing_study_are_404(hub: Hub) -> None:
    response = hub.client.get("/v1/studies/no-such-study/rounds", headers=hub.admin)

    assert response.status_code == 404


def test_every_hub_route_documents_its_errors_as_one_error_body(hub: Hub) -> None:
    schema = hub.client.get("/openapi.json", headers=hub.admin).json()

    for path, item in schema["paths"].items():
        if path.startswith("/cds-services"):
            continue  # CDS answers FHIR OperationOutcomes, documented per route
        for method, operation in item.items():
            for status in ("401", "404", "409", "413", "422"):
                content = operation["responses"][status]["content"]["application/json"]
                assert content["schema"] == {"$ref": "#/components/schemas/ErrorBody"}, (
                    method,
                    path,
                    status,
                )


def test_a_validation_error_is_one_line_without_the_values_sent(hub: Hub) -> None:
    response = hub.client.post("/v1/enrol", json={"node": "alpha", "secret": "s3cr3t-value"})

    assert response.status_code == 422
    assert isinstance(response.json()["detail"], str)
    assert "public_key" in response.json()["detail"]
    assert "s3cr3t-value" not in response.text


def test_keyring_byte_fields_fit_their_documented_length(hub: Hub) -> None:
    node = hub.enrol("alpha")
    schema = hub.client.get("/openapi.json", headers=hub.admin).json()
    documented = schema["components"]["schemas"]["KeyringEntry"]["properties"]["identity_key"]

    entry = hub.client.get("/v1/keyring", headers=node.headers).json()["nodes"][0]

    assert documented["minLength"] <= len(entry["identity_key"]) <= documented["maxLength"]
    assert len(base64.urlsafe_b64decode(entry["identity_key"])) == 32
