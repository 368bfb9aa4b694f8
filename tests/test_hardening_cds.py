"""Issue 9, items 6 and 7: CDS Hooks needs client JWTs unless an operator opts out on loopback,
one request writes a bounded audit event, and a fhirServer is read only when the operator's
allow-list names it (real sockets prove that nothing else is connected to)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from fastapi import FastAPI
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from aipipe.audit import AuditLog
from aipipe.cds import FhirAccess, JwtPolicy, PatientScorer, StaticCdsProvider, cds_router
from aipipe.cli.app import app as cli
from aipipe.errors import ConfigError
from aipipe.hub.app import create_app
from aipipe.hub.home import init_hub, load_hub
from aipipe.hub.serve import serve
from tests.cds_net import LocalCa, https_fhir, listener, make_ca
from tests.cds_support import (
    BASE,
    FHIR,
    ISSUER,
    KEY,
    SERVICE,
    Fhir,
    Signer,
    events,
    hook_request,
    prefetch_for,
)
from tests.hub_support import running_hub

Records = dict[str, list[dict[str, Any]]]
FEEDBACK = {
    "feedback": [{"card": "c", "outcome": "overridden", "outcomeTimestamp": "2024-05-01T10:00:00Z"}]
}


def router_app(
    scorer: PatientScorer,
    audit: AuditLog | None,
    *,
    jwt: JwtPolicy | None = None,
    fhir: FhirAccess | None = None,
    **options: Any,
) -> TestClient:
    app = FastAPI()
    router = cds_router(
        StaticCdsProvider([scorer]), audit=audit, jwt=jwt, pseudonym_key=KEY, fhir=fhir, **options
    )
    app.include_router(router)
    return TestClient(app)


def event_size(event: Any) -> int:
    return len(event.actor) + len(event.resource) + len(json.dumps(event.details))


# -- 6. authentication by default --------------------------------------------------------------


def test_without_clients_or_opt_out_every_cds_route_is_401(
    scorer: PatientScorer, audit: AuditLog, records: Records
) -> None:
    client = router_app(scorer, audit)

    discovery = client.get("/cds-services")
    call = client.post(
        f"/cds-services/{SERVICE}", json=hook_request(prefetch=prefetch_for(records))
    )
    feedback = client.post(f"/cds-services/{SERVICE}/feedback", json=FEEDBACK)

    assert [r.status_code for r in (discovery, call, feedback)] == [401, 401, 401]
    assert "cds_clients" in call.json()["issue"][0]["diagnostics"]
    assert [e.outcome for e in events(audit, "auth.failure")] == ["refused"] * 3
    assert events(audit, "cds.request") == []


def test_the_explicit_opt_out_serves_calls_without_a_jwt(
    scorer: PatientScorer, audit: AuditLog, records: Records
) -> None:
    client = router_app(scorer, audit, allow_unauthenticated=True)

    response = client.post(
        f"/cds-services/{SERVICE}", json=hook_request(prefetch=prefetch_for(records))
    )

    assert response.status_code == 200, response.text
    assert events(audit, "cds.request")[0].actor == "cds-client:anonymous"


def test_the_hub_answers_cds_only_with_a_jwt_unless_hub_yaml_opts_out(tmp_path: Path) -> None:
    home = tmp_path / "hub"
    with running_hub(home) as hub:
        assert hub.client.get("/cds-services").status_code == 401
        assert hub.client.post("/cds-services/any-patient-view", json={}).status_code == 401
    config = yaml.safe_load((home / "hub.yaml").read_text())
    (home / "hub.yaml").write_text(yaml.safe_dump(config | {"cds_allow_unauthenticated": True}))
    with TestClient(create_app(load_hub(home))) as client:
        assert client.get("/cds-services").json() == {"services": []}


def test_the_hub_refuses_the_opt_out_on_an_address_other_hosts_can_reach(tmp_path: Path) -> None:
    home = tmp_path / "hub"
    init_hub(home, "hardening")
    config = yaml.safe_load((home / "hub.yaml").read_text())
    (home / "hub.yaml").write_text(yaml.safe_dump(config | {"cds_allow_unauthenticated": True}))

    with pytest.raises(ConfigError, match="loopback"):
        serve(load_hub(home), "0.0.0.0", 0)
    assert not (home / "serve.json").exists()


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::"])
def test_node_serve_cds_refuses_allow_unauthenticated_off_loopback(
    tmp_path: Path, host: str
) -> None:
    result = CliRunner().invoke(
        cli,
        ["node", "serve-cds", "--home", str(tmp_path / "node"), "--study", "s",
         "--allow-unauthenticated", "--host", host],
    )  # fmt: skip

    assert result.exit_code == 2, result.output
    assert "loopback" in result.stderr and "Traceback" not in result.output


# -- 6. what one request can write ---------------------------------------------------------------


@pytest.mark.parametrize("opt_out", [True, False])
def test_an_unknown_long_service_id_is_404_and_neither_echoed_nor_audited_in_full(
    scorer: PatientScorer, audit: AuditLog, opt_out: bool
) -> None:
    client = router_app(scorer, audit, allow_unauthenticated=opt_out)
    service = "x" * 8000

    response = client.post(f"/cds-services/{service}", json=hook_request())
    feedback = client.post(f"/cds-services/{service}/feedback", json=FEEDBACK)

    assert (response.status_code, feedback.status_code) == ((404, 404) if opt_out else (401, 401))
    assert "x" * 100 not in response.text + feedback.text
    assert len(events(audit)) == 2
    assert all(event_size(e) < 1000 for e in events(audit))


def test_every_audited_field_is_bounded(
    scorer: PatientScorer, audit: AuditLog, records: Records
) -> None:
    signer = Signer("ES384")
    policy = JwtPolicy({ISSUER: {"keys": [signer.jwk]}}, base_url=BASE)
    client = router_app(scorer, audit, jwt=policy)
    huge = signer.token(headers={"kid": "k" * 6000})
    tenant = signer.token(tenant="t" * 6000)

    refused = client.post(
        f"/cds-services/{SERVICE}",
        json=hook_request(prefetch=prefetch_for(records)),
        headers={"Authorization": f"Bearer {huge}"},
    )
    served = client.post(
        f"/cds-services/{SERVICE}",
        json=hook_request(prefetch=prefetch_for(records)),
        headers={"Authorization": f"Bearer {tenant}"},
    )

    assert (refused.status_code, served.status_code) == (401, 200)
    assert len(refused.text) < 1000
    assert [event_size(e) < 2000 for e in events(audit)] == [True, True]


def test_feedback_items_per_request_are_capped_and_each_is_bounded(
    scorer: PatientScorer, audit: AuditLog
) -> None:
    client = router_app(scorer, audit, allow_unauthenticated=True)
    url = f"/cds-services/{SERVICE}/feedback"
    item = FEEDBACK["feedback"][0]
    accepted = item | {
        "outcome": "accepted",
        "card": "c" * 5000,
        "acceptedSuggestions": [{"id": f"s{i}"} for i in range(5000)],
    }

    many = client.post(url, json={"feedback": [item] * 1000})
    one = client.post(url, json={"feedback": [accepted]})

    assert (many.status_code, one.status_code) == (400, 200)
    assert len(events(audit)) == 2
    assert all(event_size(e) < 4000 for e in events(audit))


def test_a_streamed_body_over_the_cap_is_413(scorer: PatientScorer, audit: AuditLog) -> None:
    client = router_app(scorer, audit, allow_unauthenticated=True)

    def chunks() -> Iterator[bytes]:
        for _ in range(17):
            yield b" " * (1024 * 1024)

    response = client.post(
        f"/cds-services/{SERVICE}", content=chunks(), headers={"content-type": "application/json"}
    )

    assert response.status_code == 413


# -- 7. fhirServer allow-list (SSRF) -------------------------------------------------------------


def test_a_fhir_server_not_on_the_allow_list_is_never_connected_to(
    scorer: PatientScorer, audit: AuditLog, records: Records
) -> None:
    client = router_app(scorer, audit, allow_unauthenticated=True)  # no allow-list: none allowed
    partial = {k: v for k, v in prefetch_for(records).items() if k != "conditions"}

    with listener() as trap:
        nothing = client.post(f"/cds-services/{SERVICE}", json=hook_request(fhirServer=trap.url))
        some = client.post(
            f"/cds-services/{SERVICE}", json=hook_request(prefetch=partial, fhirServer=trap.url)
        )

    assert trap.connections == []
    assert nothing.status_code == 412
    assert "allow-list" in nothing.json()["issue"][0]["diagnostics"]
    assert some.status_code == 200, some.text  # scored from the prefetch alone
    for event in events(audit, "cds.request"):
        assert event.details["fhirServer_refused"] == f"https://127.0.0.1:{trap.port}"
        assert "/fhir" not in json.dumps(event.details)


def test_an_allow_list_for_one_server_does_not_reach_another(
    scorer: PatientScorer, audit: AuditLog
) -> None:
    access = FhirAccess(allowed_servers=(FHIR,))
    client = router_app(scorer, audit, allow_unauthenticated=True, fhir=access)

    with listener() as trap:
        response = client.post(f"/cds-services/{SERVICE}", json=hook_request(fhirServer=trap.url))

    assert response.status_code == 412
    assert trap.connections == []


@pytest.fixture
def ca(tmp_path: Path) -> LocalCa:
    return make_ca(tmp_path)


def test_an_allowed_fhir_server_is_read_over_tls_with_the_ca_bundle(
    scorer: PatientScorer, audit: AuditLog, records: Records, ca: LocalCa
) -> None:
    with https_fhir(ca, Fhir(records)) as ehr:
        trusted = FhirAccess(allowed_servers=(ehr.base_url,), ca_bundle=str(ca.ca_pem))
        untrusted = FhirAccess(allowed_servers=(ehr.base_url,))
        request = hook_request(fhirServer=ehr.base_url)
        read = router_app(scorer, audit, allow_unauthenticated=True, fhir=trusted).post(
            f"/cds-services/{SERVICE}", json=request
        )
        paths = list(ehr.paths)
        refused = router_app(scorer, audit, allow_unauthenticated=True, fhir=untrusted).post(
            f"/cds-services/{SERVICE}", json=hook_request(fhirServer=ehr.base_url)
        )

    assert read.status_code == 200, read.text
    assert read.json()["cards"][0]["indicator"] in ("info", "warning", "critical")
    assert any(p.startswith("/fhir/Patient/") for p in paths)
    assert refused.status_code == 412  # TLS verification stays on without the CA


ALLOWED = "https://ehr.example.org/fhir"


@pytest.mark.parametrize(
    "server",
    [
        "https://ehr.example.org/fhir",
        "https://ehr.example.org/fhir/",
        "https://EHR.example.org/fhir",
        "https://ehr.example.org:443/fhir",
        "https://ehr.example.org/fhir/tenant-1",
    ],
)
def test_the_allow_list_matches_origin_and_path_prefix(server: str) -> None:
    assert FhirAccess(allowed_servers=(ALLOWED,)).refusal(server) is None


@pytest.mark.parametrize(
    "server",
    [
        "https://ehr.example.org:8443/fhir",
        "http://ehr.example.org/fhir",
        "https://ehr.example.org.evil.example/fhir",
        "https://evil.example/fhir",
        "https://ehr.example.org/fhirx",
        "https://ehr.example.org/",
        "https://ehr.example.org/fhir/../admin",
        "https://ehr.example.org/fhir/%2e%2e/admin",
        "https://ehr.example.org/fhir/..%2fadmin",
        "https://user:pw@ehr.example.org/fhir",
        "https://ehr.example.org/fhir?_format=xml",
        "https://ehr.example.org/fhir#x",
        "https://ehr.example.org\\@evil.example/fhir",
    ],
)
def test_the_allow_list_refuses_any_other_server(server: str) -> None:
    assert FhirAccess(allowed_servers=(ALLOWED,)).refusal(server) is not None


def test_a_paging_link_outside_the_allowed_path_is_not_followed(records: Records) -> None:
    fhir = Fhir(records)
    sneaky = "https://ehr.example.org/fhir/../admin/Observation"

    def pages_away(request: httpx.Request) -> httpx.Response | None:
        if request.url.path == "/fhir/Observation":
            bundle = {"resourceType": "Bundle", "type": "searchset", "entry": []}
            return httpx.Response(
                200, json=bundle | {"link": [{"relation": "next", "url": sneaky}]}
            )
        return None

    fhir.fail = pages_away
    access = FhirAccess(transport=httpx.MockTransport(fhir), allowed_servers=(FHIR,))

    result = asyncio.run(access.fetch(FHIR, None, {"observations": "Observation?patient=p"}))

    assert "observations" in result.errors
    assert [r.url.path for r in fhir.requests] == ["/fhir/Observation"]


@pytest.mark.parametrize(
    "servers",
    [["http://ehr.example.org/fhir"], ["ehr.example.org/fhir"], ["https://ehr.example.org/f?x=1"]],
)
def test_hub_yaml_refuses_an_allow_list_entry_that_is_not_an_https_base(
    tmp_path: Path, servers: list[str]
) -> None:
    home = tmp_path / "hub"
    init_hub(home, "hardening")
    config = yaml.safe_load((home / "hub.yaml").read_text())
    (home / "hub.yaml").write_text(yaml.safe_dump(config | {"cds_fhir_servers": servers}))

    with pytest.raises(ConfigError, match="cds_fhir_servers"):
        load_hub(home)
