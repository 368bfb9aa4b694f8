"""Issue 11, item 8: CDS Hooks requires HTTPS. The hub and `node serve-cds` serve TLS with a
certificate from a CA made for the test (tests/cds_net.py), real processes on 127.0.0.1: a
client that trusts the CA is answered, one that does not fails verification, plain HTTP to the
TLS port gets nothing, a node given the hub's CA enrols and calls it and a node without it
refuses with the certificate problem. Plain HTTP on an address other hosts can reach is refused
unless the operator says --insecure-http."""

from __future__ import annotations

import json
import shutil
import socket
import ssl
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from aipipe.cli.app import app as cli
from aipipe.hub.home import init_hub
from aipipe.wire import EnrolToken
from tests.cds_net import HttpsFhir, LocalCa, https_fhir, make_ca
from tests.cds_support import Fhir, cleveland_records, hook_request
from tests.e2e_support import (
    ProcessGroup,
    Started,
    aipipe,
    aipipe_in_process,
    aipipe_json,
    wait_until,
    without_tls,
    write_test_study,
)

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
HEART = REPO / "examples" / "heart-disease"
STUDY = "tls-heart"


def trusting(ca: LocalCa) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca.ca_pem))


@dataclass(frozen=True)
class TlsHub:
    root: Path
    ca: LocalCa
    home: Path
    url: str
    node: Path  # enrolled with --hub-ca; has approved STUDY
    group: ProcessGroup


def _hub_url(home: Path, process: Started, ca: LocalCa) -> str | None:
    assert process.running(), process.log_tail()
    try:
        info = json.loads((home / "serve.json").read_text())
    except (OSError, ValueError):
        return None
    if info.get("pid") != process.pid:
        return None
    try:
        response = httpx.get(f"{info['url']}/healthz", verify=trusting(ca), timeout=2)
    except httpx.TransportError:
        return None
    return str(info["url"]) if response.status_code == 200 else None


def _serve_hub_over_tls(root: Path, ca: LocalCa, group: ProcessGroup) -> tuple[Path, str, str]:
    home = root / "hub"
    token = aipipe_json("hub", "init", "--home", home, "--json")["admin_token"]
    shutil.copy(ca.cert_pem, home / "tls-cert.pem")
    shutil.copy(ca.key_pem, home / "tls-key.pem")
    shutil.copy(ca.ca_pem, home / "test-ca.pem")
    config = yaml.safe_load((home / "hub.yaml").read_text())
    # the test CA's certificate instead of the one `hub init` made: tokens pin the test CA
    config |= {"tls_cert": "tls-cert.pem", "tls_key": "tls-key.pem", "tls_ca": "test-ca.pem"}
    (home / "hub.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    process = group.start("hub", "hub", "serve", "--home", home, "--port", "0")
    url = wait_until(lambda: _hub_url(home, process, ca), what="hub over TLS",
                     context=process.log_tail)  # fmt: skip
    return home, url, token


@pytest.fixture(scope="module")
def tls_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsHub]:
    root = tmp_path_factory.mktemp("tls")
    ca = make_ca(root)
    group = ProcessGroup(root / "logs")
    try:
        home, url, token = _serve_hub_over_tls(root, ca, group)
        enrol = aipipe_json("hub", "enrol-token", "--home", home, "--node", "east", "--json")
        aipipe("node", "init", "--home", root / "east", "--name", "east", "--hub-ca", ca.ca_pem,
               env={"AIPIPE_ENROL_TOKEN": enrol["token"]})  # fmt: skip
        study = write_test_study(root / "study.yaml", name=STUDY, deadline_s=600)
        study.write_text(study.read_text().replace("min_nodes: 2", "min_nodes: 1"))
        admin = {"AIPIPE_HUB_URL": url, "AIPIPE_TOKEN": token, "AIPIPE_HUB_CA": str(ca.ca_pem)}
        with ThreadPoolExecutor(max_workers=1) as pool:  # the node ingests while the hub publishes
            ingest = pool.submit(
                aipipe, "node", "ingest", "--home", root / "east", HEART / "fhir" / "switzerland"
            )
            aipipe("study", "publish", study, "--json", env=admin)
            ingest.result()
        aipipe_in_process("node", "approve", STUDY, "--home", root / "east", "--json")
        # A round selects east, so its credential may read the study's (initial) model.
        aipipe("train", "round", "--study", STUDY, env=admin)
        yield TlsHub(root, ca, home, url, root / "east", group)
    finally:
        group.stop()


# -- the hub ------------------------------------------------------------------------------------


def test_the_hub_serves_https_and_serve_json_names_the_https_url(tls_hub: TlsHub) -> None:
    assert tls_hub.url.startswith("https://127.0.0.1:")
    response = httpx.get(f"{tls_hub.url}/healthz", verify=trusting(tls_hub.ca), timeout=10)
    assert response.status_code == 200
    assert response.http_version == "HTTP/1.1" and response.url.scheme == "https"


def test_a_client_without_the_ca_cannot_verify_the_hub(tls_hub: TlsHub) -> None:
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{tls_hub.url}/healthz", timeout=10)


def test_plain_http_to_the_hubs_tls_port_gets_no_answer(tls_hub: TlsHub) -> None:
    with pytest.raises(httpx.TransportError):
        httpx.get(tls_hub.url.replace("https://", "http://") + "/healthz", timeout=10)


def test_a_node_with_the_hub_ca_enrols_and_calls_the_hub_over_https(tls_hub: TlsHub) -> None:
    node = yaml.safe_load((tls_hub.node / "node.yaml").read_text())
    nodes = aipipe_json("hub", "nodes", "--home", tls_hub.home, "--json")

    assert node["hub_url"] == tls_hub.url
    assert (tls_hub.node / node["hub_ca"]).read_bytes() == tls_hub.ca.ca_pem.read_bytes()
    east = next(n for n in nodes if n["name"] == "east")
    assert east["last_seen"] is not None  # `node approve` read the study over TLS


def test_a_node_with_an_unpinned_token_and_no_hub_ca_refuses_naming_the_certificate_problem(
    tls_hub: TlsHub,
) -> None:
    enrol = aipipe_json("hub", "enrol-token", "--home", tls_hub.home, "--node", "west", "--json")
    pinned = EnrolToken.decode(enrol["token"])
    unpinned = pinned.model_copy(update={"ca_cert": None, "ca_sha256": None})  # an old token

    result = aipipe("node", "init", "--home", tls_hub.root / "west", "--name", "west",
                    env={"AIPIPE_ENROL_TOKEN": unpinned.encode()}, check=False)  # fmt: skip

    assert result.returncode == 2, result.stderr
    message = " ".join(result.stderr.split())
    assert "certificate did not verify" in message and "--hub-ca" in message, message
    assert "Traceback" not in result.stderr


def test_the_hub_refuses_plain_http_on_an_address_other_hosts_can_reach(tmp_path: Path) -> None:
    without_tls(init_hub(tmp_path / "hub", "plain")[0].home)  # a home from before issue 15

    result = aipipe("hub", "serve", "--home", tmp_path / "hub", "--host", "0.0.0.0",
                    "--port", "0", check=False, timeout_s=60)  # fmt: skip

    message = " ".join(result.stderr.split())
    assert result.returncode == 2, message
    assert "plain HTTP" in message and "tls_cert" in message and "--insecure-http" in message
    assert not (tmp_path / "hub" / "serve.json").exists()


# -- node serve-cds -----------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeCds:
    url: str
    process: Started
    ehr: HttpsFhir


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def node_cds(tls_hub: TlsHub) -> Iterator[NodeCds]:
    ca, port = tls_hub.ca, _free_port()
    with https_fhir(ca, Fhir(cleveland_records())) as ehr:
        process = tls_hub.group.start(
            "serve-cds", "node", "serve-cds", "--home", tls_hub.node, "--study", STUDY,
            "--port", str(port), "--allow-unauthenticated",
            "--tls-cert", ca.cert_pem, "--tls-key", ca.key_pem,
            "--fhir-allow", ehr.base_url, "--fhir-ca-bundle", ca.ca_pem,
        )  # fmt: skip
        url = f"https://127.0.0.1:{port}"

        def ready() -> bool:
            assert process.running(), process.log_tail()
            try:
                got = httpx.get(f"{url}/cds-services", verify=trusting(ca), timeout=2)
            except httpx.TransportError:
                return False
            return got.status_code == 200

        wait_until(ready, what="node serve-cds over TLS", context=process.log_tail)
        yield NodeCds(url, process, ehr)


def test_node_serve_cds_answers_discovery_over_https_to_a_client_trusting_the_ca(
    tls_hub: TlsHub, node_cds: NodeCds
) -> None:
    response = httpx.get(f"{node_cds.url}/cds-services", verify=trusting(tls_hub.ca), timeout=10)

    assert response.status_code == 200
    ids = [service["id"] for service in response.json()["services"]]
    assert f"{STUDY}-patient-view" in ids
    logged = " ".join(node_cds.process.log.read_text().split())
    assert f"CDS Hooks at {node_cds.url}/cds-services" in logged


def test_node_serve_cds_is_refused_by_a_client_without_the_ca_and_to_plain_http(
    node_cds: NodeCds,
) -> None:
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{node_cds.url}/cds-services", timeout=10)
    with pytest.raises(httpx.TransportError):
        httpx.get(node_cds.url.replace("https://", "http://") + "/cds-services", timeout=10)


def test_node_serve_cds_reads_the_allowed_fhir_server_trusting_its_ca_bundle(
    tls_hub: TlsHub, node_cds: NodeCds
) -> None:
    request = hook_request(fhirServer=node_cds.ehr.base_url)

    response = httpx.post(f"{node_cds.url}/cds-services/{STUDY}-patient-view", json=request,
                          verify=trusting(tls_hub.ca), timeout=60)  # fmt: skip

    assert response.status_code == 200, response.text
    assert response.json()["cards"][0]["indicator"] in ("info", "warning", "critical")
    assert any(path.startswith("/fhir/Patient/") for path in node_cds.ehr.paths)


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::"])
def test_node_serve_cds_refuses_plain_http_off_loopback(tmp_path: Path, host: str) -> None:
    result = CliRunner().invoke(
        cli, ["node", "serve-cds", "--home", str(tmp_path / "node"), "--study", "s",
              "--host", host],
    )  # fmt: skip

    message = " ".join(result.stderr.split())
    assert result.exit_code == 2, result.output
    assert "plain HTTP" in message and "--tls-cert" in message and "--insecure-http" in message
    assert "Traceback" not in result.output


def test_node_serve_cds_with_insecure_http_passes_the_tls_check(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli, ["node", "serve-cds", "--home", str(tmp_path / "node"), "--study", "s",
              "--host", "0.0.0.0", "--insecure-http"],
    )  # fmt: skip

    assert result.exit_code == 2, result.output
    assert "no node at" in " ".join(result.stderr.split())  # it got past the TLS check


def test_a_key_that_does_not_match_the_certificate_is_refused_before_serving(
    tmp_path: Path,
) -> None:
    (tmp_path / "other").mkdir()
    ca, other = make_ca(tmp_path), make_ca(tmp_path / "other")

    result = CliRunner().invoke(
        cli, ["node", "serve-cds", "--home", str(tmp_path / "node"), "--study", "s",
              "--tls-cert", str(ca.cert_pem), "--tls-key", str(other.key_pem)],
    )  # fmt: skip

    message = " ".join(result.stderr.split())
    assert result.exit_code == 2, result.output
    assert "cannot load certificate" in message and "Traceback" not in result.output
