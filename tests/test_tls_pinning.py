"""Issue 15, TLS 1.3 by default: `hub init` makes a consortium CA and a hub certificate,
`hub serve` serves HTTPS with TLS 1.3 only, the enrolment token pins the CA (its certificate and
SHA-256), and an enrolled node verifies the hub against that CA alone. A node refuses, naming
the reason, a server whose certificate comes from another CA (a MITM, or a wrongly pinned CA),
has expired, or names another host. `hub tls rotate` renews the hub certificate from the same
CA and an enrolled node keeps working once the hub restarts. Real `hub serve` processes and
real sockets on 127.0.0.1; impostor servers run in threads of the test process."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import ssl
import stat
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from typer.testing import CliRunner

from aipipe.cli.app import app as cli
from aipipe.errors import TlsVerifyError
from aipipe.hub.certs import load_ca
from aipipe.hub.home import init_hub
from aipipe.node.home import hub_client
from aipipe.pki import Issued, fingerprint, issue_server_cert, load_cert, make_ca
from aipipe.settings import load_node_config, save_node_config
from aipipe.tls import client_context
from aipipe.wire import EnrolToken
from tests.e2e_support import (
    Hub,
    ProcessGroup,
    aipipe,
    aipipe_in_process,
    aipipe_json,
    restart_hub,
    start_hub,
    utc_stamp,
    wait_until,
    without_tls,
    write_test_study,
)

pytestmark = pytest.mark.e2e
HEART = Path(__file__).resolve().parents[1] / "examples" / "heart-disease"


@dataclass(frozen=True)
class Consortium:
    root: Path
    hub_home: Path
    ca_pem: Path
    node: Path  # "east", enrolled with a token that pinned the CA
    group: ProcessGroup
    hub: list[Hub]  # the current hub process (replaced on restart)

    @property
    def url(self) -> str:
        return self.hub[-1].url


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Consortium]:
    root = tmp_path_factory.mktemp("pinning")
    group = ProcessGroup(root / "logs")
    try:
        home = root / "hub"
        (root / "admin.json").write_text(aipipe("hub", "init", "--home", home, "--json").stdout)
        hub = start_hub(group, home)
        token = aipipe_json("hub", "enrol-token", "--home", home, "--node", "east", "--json")
        aipipe("node", "init", "--home", root / "east", "--name", "east",
               env={"AIPIPE_ENROL_TOKEN": token["token"]})  # fmt: skip
        yield Consortium(root, home, home / "ca-cert.pem", root / "east", group, [hub])
    finally:
        group.stop()


def _trusting(ca_pem: Path, *, highest: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca_pem))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if highest is not None:
        context.maximum_version = highest
    return context


# -- hub init: the CA and the certificate -------------------------------------------------------


def test_hub_init_makes_a_consortium_ca_and_a_hub_certificate_for_the_given_names(
    tmp_path: Path,
) -> None:
    home = tmp_path / "hub"
    names = ["--tls-name", "hub.example.org", "--tls-name", "10.0.0.5"]
    result = CliRunner().invoke(cli, ["hub", "init", "--home", str(home), "--json", *names])
    assert result.exit_code == 0, result.output
    config = yaml.safe_load((home / "hub.yaml").read_text())
    ca = load_cert((home / config["tls_ca"]).read_bytes(), "ca")
    cert = load_cert((home / config["tls_cert"]).read_bytes(), "cert")

    assert json.loads(result.stdout)["ca_sha256"] == fingerprint(ca)
    basic = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert basic.ca and basic.path_length == 0
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert ca.not_valid_after_utc - ca.not_valid_before_utc > dt.timedelta(days=9 * 365)
    assert cert.issuer == ca.subject
    cert.verify_directly_issued_by(ca)
    alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert alt.get_values_for_type(x509.DNSName) == ["hub.example.org"]
    assert [str(ip) for ip in alt.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]
    assert cert.not_valid_after_utc - cert.not_valid_before_utc < dt.timedelta(days=370)
    for key in ("ca-key.pem", config["tls_key"]):
        assert stat.S_IMODE((home / key).stat().st_mode) == 0o600


# -- hub serve: HTTPS, TLS 1.3 only --------------------------------------------------------------


def test_the_hub_serves_tls_1_3_and_refuses_a_client_capped_at_tls_1_2(
    consortium: Consortium,
) -> None:
    assert consortium.url.startswith("https://127.0.0.1:")
    ok = httpx.get(f"{consortium.url}/healthz", verify=_trusting(consortium.ca_pem), timeout=10)
    assert ok.status_code == 200

    capped = _trusting(consortium.ca_pem, highest=ssl.TLSVersion.TLSv1_2)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{consortium.url}/healthz", verify=capped, timeout=10)


def test_an_old_hub_home_without_a_certificate_is_told_how_to_make_one(tmp_path: Path) -> None:
    without_tls(init_hub(tmp_path / "hub", "old")[0].home)

    result = CliRunner().invoke(cli, ["hub", "serve", "--home", str(tmp_path / "hub"),
                                      "--port", "0"])  # fmt: skip

    message = " ".join(result.stderr.split())
    assert result.exit_code == 2, result.output
    assert "aipipe hub tls rotate" in message and "--insecure-http" in message, message
    assert not (tmp_path / "hub" / "serve.json").exists()


def test_insecure_http_is_refused_off_loopback(tmp_path: Path) -> None:
    init_hub(tmp_path / "hub", "dev")

    args = ["--host", "0.0.0.0", "--port", "0", "--insecure-http"]
    result = CliRunner().invoke(cli, ["hub", "serve", "--home", str(tmp_path / "hub"), *args])

    message = " ".join(result.stderr.split())
    assert result.exit_code == 2, result.output
    assert "loopback" in message and "plain HTTP" in message, message


# -- the token pins the CA; the node trusts it alone ----------------------------------------------


def test_the_enrolment_token_pins_the_consortium_ca(consortium: Consortium) -> None:
    issued = aipipe_json("hub", "enrol-token", "--home", consortium.hub_home, "--node", "north",
                         "--json")  # fmt: skip
    token = EnrolToken.decode(issued["token"])
    ca = load_cert(consortium.ca_pem.read_bytes(), "ca")

    assert token.ca_sha256 == fingerprint(ca) == issued["ca_sha256"]
    assert load_cert(token.ca_der(), "pinned") == ca


def test_a_token_whose_ca_does_not_match_its_fingerprint_is_refused() -> None:
    other = make_ca("other").cert.public_bytes(Encoding.DER)
    raw = {"hub_url": "https://hub", "node": "east", "secret": "s" * 43,
           "ca_sha256": "0" * 64, "ca_cert": base64.b64encode(other).decode()}  # fmt: skip
    text = "aipipe-enrol." + base64.urlsafe_b64encode(json.dumps(raw).encode()).decode()

    with pytest.raises(ValueError, match="damaged"):
        EnrolToken.decode(text)
    old = EnrolToken(hub_url="https://hub", node="east", secret="s" * 43)  # before issue 15
    assert EnrolToken.decode(old.encode()).ca_sha256 is None


def test_the_enrolled_node_keeps_the_pinned_ca_and_trusts_it_alone(
    consortium: Consortium,
) -> None:
    paths = load_node_config(consortium.node)

    assert paths.config.hub_ca_pinned and paths.config.hub_url == consortium.url
    kept = load_cert((consortium.node / str(paths.config.hub_ca)).read_bytes(), "kept")
    assert kept == load_cert(consortium.ca_pem.read_bytes(), "ca")
    context = client_context(consortium.node / str(paths.config.hub_ca), only=True)
    assert len(context.get_ca_certs()) == 1  # no public CA
    assert context.minimum_version == ssl.TLSVersion.TLSv1_3
    with hub_client(paths) as client:
        assert client.health()["status"] == "ok"


# -- refusals that say why -----------------------------------------------------------------------


@contextmanager
def impostor(issued: Issued, directory: Path) -> Iterator[str]:
    """An HTTPS server on 127.0.0.1 presenting `issued`; answers every GET with 200 {}."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "cert.pem").write_bytes(issued.cert_pem())
    (directory / "key.pem").write_bytes(issued.key_pem())

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, format: str, *args: object) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(directory / "cert.pem", directory / "key.pem")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _node_call_refused(consortium: Consortium, url: str) -> str:
    """What the enrolled node says when its hub URL leads to `url` (its home is not changed)."""
    paths = load_node_config(consortium.node)
    paths.config.hub_url = url
    with pytest.raises(TlsVerifyError) as refused, hub_client(paths) as client:
        client.health()
    return str(refused.value)


def test_a_mitm_certificate_from_another_ca_is_refused_as_unknown_ca(
    consortium: Consortium, tmp_path: Path
) -> None:
    forged = issue_server_cert(make_ca("mallory"), ["127.0.0.1", "localhost"])
    with impostor(forged, tmp_path) as url:
        message = _node_call_refused(consortium, url)

    assert "unknown CA" in message and "pinned" in message, message


def test_an_expired_hub_certificate_is_refused_as_expired(
    consortium: Consortium, tmp_path: Path
) -> None:
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=400)
    stale = issue_server_cert(load_ca(consortium.hub_home), ["127.0.0.1"], valid_from=long_ago)
    with impostor(stale, tmp_path) as url:
        message = _node_call_refused(consortium, url)

    assert "expired" in message, message


def test_a_certificate_for_another_host_is_refused_as_hostname_mismatch(
    consortium: Consortium, tmp_path: Path
) -> None:
    elsewhere = issue_server_cert(load_ca(consortium.hub_home), ["other.example.org"])
    with impostor(elsewhere, tmp_path) as url:
        message = _node_call_refused(consortium, url)

    assert "hostname mismatch" in message, message


def test_a_node_daemon_facing_a_mitm_exits_saying_why_instead_of_retrying(
    consortium: Consortium, tmp_path: Path
) -> None:
    forged = issue_server_cert(make_ca("mallory"), ["127.0.0.1", "localhost"])
    paths = load_node_config(consortium.node)
    real_url = paths.config.hub_url
    with impostor(forged, tmp_path) as url:
        paths.config.hub_url = url
        save_node_config(consortium.node, paths.config)
        try:
            result = aipipe("node", "start", "--home", consortium.node, "--poll", "1",
                            check=False, timeout_s=120)  # fmt: skip
        finally:
            paths.config.hub_url = real_url
            save_node_config(consortium.node, paths.config)

    message = " ".join(result.stderr.split())
    assert result.returncode == 2, message
    assert "unknown CA" in message and "Traceback" not in result.stderr, message


def test_a_token_pinning_another_ca_enrols_nothing_and_sends_no_secret(
    consortium: Consortium,
) -> None:
    issued = aipipe_json("hub", "enrol-token", "--home", consortium.hub_home, "--node", "west",
                         "--json")  # fmt: skip
    token = EnrolToken.decode(issued["token"])
    wrong = make_ca("wrong").cert.public_bytes(Encoding.DER)
    repinned = token.model_copy(
        update={"ca_cert": base64.b64encode(wrong).decode(),
                "ca_sha256": hashlib.sha256(wrong).hexdigest()}
    )  # fmt: skip

    result = aipipe("node", "init", "--home", consortium.root / "west", "--name", "west",
                    env={"AIPIPE_ENROL_TOKEN": repinned.encode()}, check=False)  # fmt: skip

    message = " ".join(result.stderr.split())
    assert result.returncode == 2 and "unknown CA" in message, message
    nodes = aipipe_json("hub", "nodes", "--home", consortium.hub_home, "--json")
    assert "west" not in {n["name"] for n in nodes}
    # the secret never reached the hub: the genuine token still enrols
    west = consortium.root / "west"
    genuine = {"AIPIPE_ENROL_TOKEN": issued["token"]}
    enrolled = aipipe_json("node", "init", "--home", west, "--name", "west", "--force", "--json",
                           env=genuine)  # fmt: skip
    assert enrolled["hub_ca_sha256"] == token.ca_sha256


# -- a whole round over HTTPS --------------------------------------------------------------------


def test_a_node_enrols_and_trains_a_plaintext_round_over_https(consortium: Consortium) -> None:
    """Real `hub serve` and `node start` processes; the node's only trust is the token's CA."""
    home, study = consortium.root / "south", "tls-round"
    token = aipipe_json("hub", "enrol-token", "--home", consortium.hub_home, "--node", "south",
                        "--json")["token"]  # fmt: skip
    aipipe("node", "init", "--home", home, "--name", "south", env={"AIPIPE_ENROL_TOKEN": token})
    spec = write_test_study(consortium.root / "round.yaml", name=study, deadline_s=120,
                            secure={"min_nodes": 1, "secure": "none"})  # fmt: skip
    admin_token = json.loads((consortium.root / "admin.json").read_text())["admin_token"]
    admin = {"AIPIPE_HUB_URL": consortium.url, "AIPIPE_TOKEN": admin_token,
             "AIPIPE_HUB_CA": str(consortium.ca_pem)}  # fmt: skip
    with ThreadPoolExecutor(max_workers=1) as pool:  # the node ingests while the hub publishes
        ingest = pool.submit(
            aipipe, "node", "ingest", "--home", home, HEART / "fhir" / "switzerland"
        )
        aipipe("study", "publish", spec, "--json", env=admin)
        ingest.result()
    aipipe_in_process("node", "approve", study, "--home", home, "--json")
    headers = {"Authorization": f"Bearer {admin_token}"}
    hub = httpx.Client(base_url=consortium.url, headers=headers,
                       verify=_trusting(consortium.ca_pem), timeout=30)  # fmt: skip
    since = utc_stamp()
    daemon = consortium.group.start("south", "node", "start", "--home", home, "--poll", "1")
    polled = lambda: any(n["name"] == "south" and (n["last_seen"] or "") > since  # noqa: E731
                         for n in hub.get("/v1/nodes").json())  # fmt: skip
    wait_until(polled, what="south to poll the hub over HTTPS", context=daemon.log_tail)

    # east and west are enrolled but run no daemon: the round closes at its deadline with south
    aipipe("train", "round", "--study", study, "--deadline", "10", "--wait", env=admin,
           timeout_s=300)  # fmt: skip

    info = hub.get(f"/v1/studies/{study}/rounds/1").json()
    hub.close()
    assert info["state"] == "closed" and info["result_version"], (info, daemon.log_tail())
    assert "south" in info["reported"], info
    assert load_node_config(home).config.hub_ca_pinned
    assert daemon.running(), daemon.log_tail()


# -- rotation ------------------------------------------------------------------------------------


def test_rotating_the_hub_certificate_keeps_an_enrolled_node_working(
    consortium: Consortium,
) -> None:
    before = load_cert((consortium.hub_home / "tls-cert.pem").read_bytes(), "before")
    consortium.hub[-1].process.kill()

    rotated = aipipe_json("hub", "tls", "rotate", "--home", consortium.hub_home, "--json")
    consortium.hub.append(restart_hub(consortium.group, consortium.hub[-1]))

    after = load_cert((consortium.hub_home / "tls-cert.pem").read_bytes(), "after")
    assert after.serial_number != before.serial_number
    assert sorted(rotated["names"]) == ["127.0.0.1", "localhost"]
    assert rotated["ca_sha256"] == fingerprint(load_cert(consortium.ca_pem.read_bytes(), "ca"))
    with hub_client(load_node_config(consortium.node)) as client:
        assert client.health()["status"] == "ok"  # the node changed nothing
    served = ssl.get_server_certificate(("127.0.0.1", int(consortium.url.rsplit(":", 1)[1])))
    assert load_cert(served.encode(), "served").serial_number == after.serial_number
