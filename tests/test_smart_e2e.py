"""SMART Backend Services against a real SMART-protected FHIR server (sekmet-fhir).

sekmet registers our public JWK Set for a client_id and checks client assertions the way the
spec asks (signature, aud = its token URL, exp at most 5 minutes ahead, jti not replayed). Test
data is loaded through a static bearer token that sekmet accepts alongside SMART (`types:
[smart, bearer]`), an admin path the node itself never has. sekmet reads its clients once at
start, so revoking a client means removing it from the settings and restarting the server.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from aipipe.errors import FhirServerError
from aipipe.fhir.server import FhirServerSource
from aipipe.fhir.smart import SmartAuthError, SmartBackendAuth, SmartKey
from tests.fhir_server import FhirTestServer, start_fhir_server

pytestmark = pytest.mark.e2e

CLIENT_ID = "aipipe-node"
ADMIN_TOKEN = secrets.token_urlsafe(24)
SHORT_LIFETIME_S = 2


def server_auth(key: SmartKey | None, token_lifetime: int) -> dict[str, Any]:
    """sekmet's settings: our client (when `key` is given) plus the admin's static token."""
    clients = []
    if key is not None:
        clients.append({"client_id": CLIENT_ID, "jwks": key.public_jwks(), "scopes": "system/*.rs"})
    return {
        "types": ["smart", "bearer"],
        "tokens": [ADMIN_TOKEN],
        "smart_clients": clients,
        "token_lifetime": token_lifetime,
        "enforce_scopes": True,
    }


def small_transaction() -> dict[str, Any]:
    def entry(n: int, resource: dict[str, Any]) -> dict[str, Any]:
        request = {"method": "POST", "url": resource["resourceType"]}
        return {
            "fullUrl": f"urn:uuid:{n:08d}-0000-4000-8000-000000000000",
            "resource": resource,
            "request": request,
        }

    patients = [
        entry(i, {"resourceType": "Patient", "gender": "female", "birthDate": f"19{50 + i}-01-01"})
        for i in range(2)
    ]
    observations = [
        entry(
            10 + i,
            {
                "resourceType": "Observation",
                "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": "2093-3"}]},
                "subject": {"reference": patients[i % 2]["fullUrl"]},
                "valueQuantity": {
                    "value": 180 + i,
                    "unit": "mg/dL",
                    "system": "http://unitsofmeasure.org",
                    "code": "mg/dL",
                },
            },
        )
        for i in range(3)
    ]
    return {"resourceType": "Bundle", "type": "transaction", "entry": patients + observations}


def load_as_admin(server: FhirTestServer) -> dict[str, set[str]]:
    server.client.headers["Authorization"] = f"Bearer {ADMIN_TOKEN}"
    response = server.post_bundle(small_transaction())
    ids: dict[str, set[str]] = {}
    for item in response["entry"]:
        rtype, rid = item["response"]["location"].split("/")[-4:-2]
        ids.setdefault(rtype, set()).add(rid)
    return ids


class RecordingTransport(httpx.HTTPTransport):
    """A real transport that notes each FHIR answer's status."""

    def __init__(self) -> None:
        super().__init__()
        self.statuses: list[int] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        self.statuses.append(response.status_code)
        return response


def pull_ids(
    base_url: str,
    auth: SmartBackendAuth,
    resource_type: str,
    transport: httpx.BaseTransport | None = None,
) -> set[str]:
    with FhirServerSource(base_url=base_url, auth=auth, max_retries=0, transport=transport) as src:
        return {resource["id"] for resource in src.iter_resources(resource_type)}


@pytest.fixture(scope="module")
def node_key() -> SmartKey:
    return SmartKey.generate("ES384")


@pytest.fixture(scope="module")
def ehr(
    tmp_path_factory: pytest.TempPathFactory, node_key: SmartKey
) -> Iterator[tuple[FhirTestServer, dict[str, set[str]]]]:
    with start_fhir_server(tmp_path_factory.mktemp("smart"), server_auth(node_key, 300)) as server:
        yield server, load_as_admin(server)


def test_node_pulls_patients_and_observations_with_a_smart_token(
    ehr: tuple[FhirTestServer, dict[str, set[str]]], node_key: SmartKey
) -> None:
    server, ids = ehr
    auth = SmartBackendAuth(base_url=server.base_url, client_id=CLIENT_ID, key=node_key)

    patients = pull_ids(server.base_url, auth, "Patient")
    observations = pull_ids(server.base_url, auth, "Observation")

    assert (patients, observations) == (ids["Patient"], ids["Observation"])
    assert auth.tokens_fetched == 1
    # sekmet grants only what the client is registered for (system/*.rs): no RiskAssessment.cu
    assert auth.granted_scopes is not None and "system/Patient.rs" in auth.granted_scopes
    assert "RiskAssessment" not in auth.granted_scopes


def test_server_refuses_a_pull_without_a_token(
    ehr: tuple[FhirTestServer, dict[str, set[str]]],
) -> None:
    server, _ = ehr

    with (
        FhirServerSource(base_url=server.base_url, max_retries=0) as source,
        pytest.raises(FhirServerError, match="answered 401"),
    ):
        list(source.iter_resources("Patient"))


def test_unregistered_key_is_rejected_with_its_kid(
    ehr: tuple[FhirTestServer, dict[str, set[str]]],
) -> None:
    server, _ = ehr
    stranger = SmartKey.generate("ES384")
    auth = SmartBackendAuth(base_url=server.base_url, client_id=CLIENT_ID, key=stranger)

    with pytest.raises(SmartAuthError) as caught:
        pull_ids(server.base_url, auth, "Patient")

    message = str(caught.value)
    assert "rejected this node's client assertion" in message
    assert stranger.kid in message and CLIENT_ID in message
    assert "verification failed" in message  # sekmet's error_description, passed on


@pytest.fixture(scope="module")
def short_lived_ehr(
    tmp_path_factory: pytest.TempPathFactory, node_key: SmartKey
) -> Iterator[FhirTestServer]:
    workdir = tmp_path_factory.mktemp("smart-short")
    with start_fhir_server(workdir, server_auth(node_key, SHORT_LIFETIME_S)) as server:
        load_as_admin(server)
        yield server


def test_token_is_renewed_before_the_server_expires_it(
    short_lived_ehr: FhirTestServer, node_key: SmartKey
) -> None:
    base_url = short_lived_ehr.base_url
    auth = SmartBackendAuth(base_url=base_url, client_id=CLIENT_ID, key=node_key)
    recorder = RecordingTransport()
    first = pull_ids(base_url, auth, "Patient", recorder)

    time.sleep(SHORT_LIFETIME_S / 2 + 0.2)  # past the renewal point (half of a 2 s lifetime)
    second = pull_ids(base_url, auth, "Patient", recorder)

    assert first == second and len(first) == 2
    assert auth.tokens_fetched == 2
    assert 401 not in recorder.statuses


def test_token_the_server_has_expired_is_replaced_after_one_401(
    short_lived_ehr: FhirTestServer, node_key: SmartKey
) -> None:
    base_url = short_lived_ehr.base_url
    frozen = time.time()  # our clock stands still, so only the server's 401 can trigger renewal
    auth = SmartBackendAuth(
        base_url=base_url, client_id=CLIENT_ID, key=node_key, clock=lambda: frozen
    )
    recorder = RecordingTransport()
    pull_ids(base_url, auth, "Patient", recorder)

    time.sleep(SHORT_LIFETIME_S + 0.3)  # the server-side expiry of the first token
    again = pull_ids(base_url, auth, "Patient", recorder)

    assert len(again) == 2
    assert recorder.statuses == [200, 401, 200]
    assert auth.tokens_fetched == 2


def test_removed_client_is_refused_with_a_clear_error(tmp_path: Path, node_key: SmartKey) -> None:
    with start_fhir_server(tmp_path, server_auth(node_key, 300)) as server:
        load_as_admin(server)
        before = SmartBackendAuth(base_url=server.base_url, client_id=CLIENT_ID, key=node_key)
        assert len(pull_ids(server.base_url, before, "Patient")) == 2

    # the EHR team revokes the node: its client is removed and the server restarted
    with start_fhir_server(tmp_path, server_auth(None, 300)) as server:
        after = SmartBackendAuth(base_url=server.base_url, client_id=CLIENT_ID, key=node_key)
        with pytest.raises(SmartAuthError) as caught:
            pull_ids(server.base_url, after, "Patient")

    message = str(caught.value)
    assert "rejected this node's client assertion" in message
    assert f"Unknown client_id '{CLIENT_ID}'" in message


def test_cli_node_created_with_a_smart_client_pulls_through_smart(tmp_path: Path) -> None:
    home = tmp_path / "node"
    init = subprocess.run(
        [sys.executable, "-m", "aipipe", "node", "init", "--home", str(home), "--name", "n1",
         "--smart-client-id", CLIENT_ID],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    jwks = json.loads(init.stdout[init.stdout.index("{") :])
    registered = {"client_id": CLIENT_ID, "jwks": jwks, "scopes": "system/*.rs"}
    settings = {**server_auth(None, 300), "smart_clients": [registered]}

    (tmp_path / "ehr").mkdir()
    with start_fhir_server(tmp_path / "ehr", settings) as server:
        ids = load_as_admin(server)
        pulled = subprocess.run(
            [sys.executable, "-m", "aipipe", "node", "ingest", "--home", str(home),
             "--fhir-url", server.base_url, "--types", "Patient,Observation", "--json"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip

    assert pulled.returncode == 0, pulled.stderr
    report = json.loads(pulled.stdout)
    assert report["types"]["Patient"]["stored"] == len(ids["Patient"])
    assert report["types"]["Observation"]["stored"] == len(ids["Observation"])
    assert (home / "smart.key").stat().st_mode & 0o077 == 0
