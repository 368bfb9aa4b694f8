"""Issue 15, optional mutual TLS: a hub with `mtls: required` (`hub init --mtls`) asks every
client for a certificate from the consortium CA; nodes get one at enrolment (their CSR, signed
for their own name, clientAuth only) and renew it with one command (`aipipe node tls renew`).
A node credential counts only with that node's certificate: no certificate, another node's,
one from another CA or an expired one is refused, and saying why. People's tokens and health
probes need none. A real `hub serve` process, real sockets on 127.0.0.1; the nodes are homes
enrolled from this process."""

from __future__ import annotations

import datetime as dt
import shutil
import signal
import socket
import ssl
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from typer.testing import CliRunner

from aipipe.cli.app import app as cli
from aipipe.errors import AipipeError, ConfigError, ForbiddenError, TlsVerifyError
from aipipe.hub.certs import load_ca
from aipipe.hub.hub import Hub as HubHome
from aipipe.node.client import HubClient
from aipipe.node.client_cert import CLIENT_CERT, CLIENT_KEY, Renewer, due
from aipipe.node.home import enrol, hub_client, init_node
from aipipe.pki import Issued, check_csr, issue_client_cert, load_cert, make_ca, make_csr
from aipipe.settings import NodePaths
from aipipe.tls import client_context
from aipipe.wire import EnrolToken
from tests.e2e_support import (
    Hub,
    ProcessGroup,
    aipipe,
    node_audit_events,
    restart_hub,
    start_hub,
)

pytestmark = pytest.mark.e2e


@dataclass
class Mutual:
    root: Path
    home: Path
    admin: str
    group: ProcessGroup
    hub: list[Hub]
    nodes: dict[str, NodePaths]

    @property
    def url(self) -> str:
        return self.hub[-1].url

    def credential(self, node: str) -> str:
        return (self.nodes[node].home / "hub.credential").read_text().strip()

    def pair(self, node: str) -> tuple[bytes, bytes]:
        home = self.nodes[node].home
        return (home / CLIENT_CERT).read_bytes(), (home / CLIENT_KEY).read_bytes()

    def client(self, token: str, pair: tuple[bytes, bytes] | None) -> HubClient:
        ca = self.home / "ca-cert.pem"
        return HubClient(self.url, token=token, ca_bundle=ca, ca_only=True, client_pair=pair,
                         max_retries=0)  # fmt: skip

    def refused(
        self, token: str, pair: tuple[bytes, bytes] | None, error: type[AipipeError]
    ) -> str:
        """What a node call with `token` and client certificate `pair` is refused with."""
        with self.client(token, pair) as client, pytest.raises(error) as refused:
            client.work(0)
        return str(refused.value)

    def hub_events(self, action: str) -> list[dict[str, object]]:
        return [e for e in node_audit_events(self.home) if e["action"] == action]


def _enrol(hub_home: Path, root: Path, name: str, url: str) -> NodePaths:
    with HubHome.open(hub_home) as hub:
        token = hub.enrol_token(name, url=url, ttl_s=3600, replace=hub.store.is_enrolled(name))
    paths = init_node(root / name, name, force=(root / name / "node.yaml").exists())
    enrol(paths, token.token)
    return paths


@pytest.fixture(scope="module")
def mutual(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mutual]:
    root = tmp_path_factory.mktemp("mtls")
    group = ProcessGroup(root / "logs")
    home = root / "hub"
    try:
        _, admin = HubHome.init(home, "hub", mtls=True)
        hub = start_hub(group, home)
        nodes = {name: _enrol(home, root, name, hub.url) for name in ("east", "west")}
        yield Mutual(root, home, admin, group, [hub], nodes)
    finally:
        group.stop()


def _trusting(ca_pem: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca_pem))


def _hub_answer(mutual: Mutual, pair: tuple[bytes, bytes]) -> bytes:
    """What the hub answers a health probe over a raw TLS connection presenting `pair`:
    nothing at all when it refused the certificate in the handshake."""
    url = urlsplit(mutual.url)
    assert url.hostname is not None and url.port is not None
    context = client_context(mutual.home / "ca-cert.pem", only=True, client_pair=pair)
    with (
        socket.create_connection((url.hostname, url.port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=url.hostname) as tls,
    ):
        tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: hub\r\nConnection: close\r\n\r\n")
        try:
            return tls.recv(64)
        except (ssl.SSLError, ConnectionError):
            return b""


# -- enrolment: a client certificate for the node's own name ----------------------------------


def test_enrolment_gives_the_node_a_client_only_certificate_from_the_consortium_ca(
    mutual: Mutual,
) -> None:
    home = mutual.nodes["east"].home
    cert = load_cert((home / CLIENT_CERT).read_bytes(), "client cert")
    ca = load_cert((mutual.home / "ca-cert.pem").read_bytes(), "ca")

    cert.verify_directly_issued_by(ca)
    assert cert.subject.rfc4514_string() == "CN=east"
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=89) < lifetime < dt.timedelta(days=91)
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    for name in (CLIENT_KEY, CLIENT_CERT):
        assert stat.S_IMODE((home / name).stat().st_mode) == 0o600
    issued = mutual.hub_events("node.cert_issued")
    assert {e["actor"] for e in issued} >= {"east", "west"}
    assert all(e["details"]["op"] in ("enrol", "renew") for e in issued)  # type: ignore[index]


def test_a_node_with_its_certificate_calls_the_hub(mutual: Mutual) -> None:
    assert _hub_answer(mutual, mutual.pair("east")).startswith(b"HTTP/1.1 200")
    with hub_client(mutual.nodes["east"]) as client:
        assert client.work(0).kind == "idle"


def test_a_node_daemon_runs_under_mutual_tls_and_one_without_a_certificate_says_re_enrol(
    mutual: Mutual, tmp_path: Path
) -> None:
    home = mutual.nodes["east"].home
    aipipe("node", "start", "--home", home, "--once", timeout_s=120)

    bare = tmp_path / "east-without-certificate"
    shutil.copytree(home, bare)
    for name in (CLIENT_CERT, CLIENT_KEY):
        (bare / name).unlink()
    result = aipipe("node", "start", "--home", bare, "--once", check=False, timeout_s=120)
    message = " ".join(result.stderr.split())
    assert result.returncode != 0 and "Traceback" not in result.stderr, message
    assert "presented no client certificate" in message
    assert "aipipe hub enrol-token --node east --replace" in message


def test_health_enrolment_and_people_need_no_client_certificate(mutual: Mutual) -> None:
    verify = _trusting(mutual.home / "ca-cert.pem")
    assert httpx.get(f"{mutual.url}/healthz", verify=verify, timeout=10).status_code == 200
    admin = {"Authorization": f"Bearer {mutual.admin}"}
    listed = httpx.get(f"{mutual.url}/v1/nodes", headers=admin, verify=verify, timeout=10)
    assert listed.status_code == 200
    assert {n["name"] for n in listed.json()} >= {"east", "west"}


# -- refusals ----------------------------------------------------------------------------------


def test_a_node_credential_without_a_certificate_is_refused_and_told_to_re_enrol(
    mutual: Mutual,
) -> None:
    message = mutual.refused(mutual.credential("east"), None, ForbiddenError)
    assert "presented no client certificate" in message
    assert "aipipe hub enrol-token --node east --replace" in message
    reasons = [e["details"]["reason"] for e in mutual.hub_events("auth.refused")]  # type: ignore[index]
    assert any("east" in r and "no client certificate" in r for r in reasons)


def test_a_node_enrolled_before_mtls_gets_a_clear_error_and_re_enrols(mutual: Mutual) -> None:
    paths = _enrol(mutual.home, mutual.root, "north", mutual.url)
    for name in (CLIENT_CERT, CLIENT_KEY):  # as a node enrolled before client certificates
        (paths.home / name).unlink()
    with hub_client(paths) as client, pytest.raises(ForbiddenError, match="re-enrol"):
        client.work(0)

    result = CliRunner().invoke(cli, ["node", "tls", "renew", "--home", str(paths.home)])
    assert result.exit_code != 0 and "re-enrol" in result.output, result.output
    with HubHome.open(mutual.home) as hub:
        token = hub.enrol_token("north", url=mutual.url, ttl_s=600, replace=True).token
    result = CliRunner().invoke(cli, ["node", "enrol", "--home", str(paths.home), "--token", token])
    assert result.exit_code == 0, result.output
    with hub_client(paths) as client:
        assert client.work(0).kind == "idle"


def test_node_a_certificate_with_node_b_credential_is_refused_and_audited(mutual: Mutual) -> None:
    message = mutual.refused(mutual.credential("west"), mutual.pair("east"), ForbiddenError)
    assert "node 'east''s but the credential is node 'west''s" in message
    refusals = mutual.hub_events("auth.refused")
    assert any(
        e["actor"] == "node/west" and "node 'east'" in e["details"]["reason"]  # type: ignore[index]
        for e in refusals
    )


def _foreign_pair(name: str, ca: Issued, *, valid_from: dt.datetime | None = None,
                  days: int = 90) -> tuple[bytes, bytes]:  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    csr = check_csr(make_csr(key, name).decode(), name)
    cert = issue_client_cert(ca, csr, name, days=days, valid_from=valid_from)
    return Issued(cert, key).cert_pem(), Issued(cert, key).key_pem()


def test_a_certificate_from_another_ca_is_refused_at_the_handshake(mutual: Mutual) -> None:
    pair = _foreign_pair("east", make_ca("impostor"))
    assert _hub_answer(mutual, pair) == b""
    message = mutual.refused(mutual.credential("east"), pair, TlsVerifyError)
    assert "refuses this node's client certificate" in message
    assert "unknown CA" in message


def test_an_expired_client_certificate_is_refused(mutual: Mutual) -> None:
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=40)
    pair = _foreign_pair("east", load_ca(mutual.home), valid_from=long_ago, days=30)
    assert _hub_answer(mutual, pair) == b""
    message = mutual.refused(mutual.credential("east"), pair, TlsVerifyError)
    assert "refuses this node's client certificate, which expired at" in message


def test_the_hub_certificate_is_no_client_certificate(mutual: Mutual) -> None:
    """The hub's own certificate (serverAuth only, same CA) does not pass as a client's."""
    pair = ((mutual.home / "tls-cert.pem").read_bytes(), (mutual.home / "tls-key.pem").read_bytes())
    assert _hub_answer(mutual, pair) == b""
    message = mutual.refused(mutual.credential("east"), pair, TlsVerifyError)
    assert "not for client authentication" in message


# -- the CSR the hub signs ----------------------------------------------------------------------


def test_the_hub_refuses_a_csr_for_another_name_or_key_type_and_keeps_the_token(
    mutual: Mutual,
) -> None:
    with HubHome.open(mutual.home) as hub:
        token = EnrolToken.decode(hub.enrol_token("south", url=mutual.url, ttl_s=600).token)
    body = {"node": "south", "secret": token.secret, "public_key": "ab" * 32}
    verify = _trusting(mutual.home / "ca-cert.pem")
    key = ec.generate_private_key(ec.SECP256R1())

    for_east = {**body, "client_csr": make_csr(key, "east").decode()}
    refused = httpx.post(f"{mutual.url}/v1/enrol", json=for_east, verify=verify, timeout=10)
    assert refused.status_code == 400
    assert "not 'CN=south'" in refused.json()["detail"]
    reasons = [str(e["details"]) for e in mutual.hub_events("enrolment") if e["actor"] == "south"]
    assert any("client CSR refused" in r for r in reasons)

    own = {**body, "client_csr": make_csr(key, "south").decode()}
    enrolled = httpx.post(f"{mutual.url}/v1/enrol", json=own, verify=verify, timeout=10)
    assert enrolled.status_code == 200, enrolled.text  # the refusal did not spend the token
    cert = load_cert(enrolled.json()["client_cert"]["cert"].encode(), "south's certificate")
    assert cert.subject.rfc4514_string() == "CN=south"

    with pytest.raises(ConfigError, match="not ECDSA P-256"):
        check_csr(_rsa_csr("south"), "south")
    with pytest.raises(ConfigError, match="not a PEM certificate request"):
        check_csr("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n", "south")


def _rsa_csr(name: str) -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return make_csr(key, name).decode()  # type: ignore[arg-type]


# -- renewal and rotation -----------------------------------------------------------------------


def test_renewal_is_one_command_and_the_old_pair_is_replaced(mutual: Mutual) -> None:
    paths = mutual.nodes["west"]
    before = load_cert((paths.home / CLIENT_CERT).read_bytes(), "before")
    key_before = (paths.home / CLIENT_KEY).read_bytes()
    assert not due(before)
    assert due(before, before.not_valid_after_utc - dt.timedelta(days=29))

    result = CliRunner().invoke(cli, ["node", "tls", "renew", "--home", str(paths.home), "--json"])
    assert result.exit_code == 0, result.output
    after = load_cert((paths.home / CLIENT_CERT).read_bytes(), "after")
    assert after.serial_number != before.serial_number
    assert (paths.home / CLIENT_KEY).read_bytes() != key_before
    assert stat.S_IMODE((paths.home / CLIENT_KEY).stat().st_mode) == 0o600
    with hub_client(paths) as client:
        assert client.work(0).kind == "idle"
    renewals = [e for e in mutual.hub_events("node.cert_issued") if e["actor"] == "west"]
    assert renewals[-1]["details"]["op"] == "renew"  # type: ignore[index]


def test_a_running_node_renews_its_certificate_by_itself_when_a_third_is_left(
    mutual: Mutual,
) -> None:
    paths = mutual.nodes["east"]
    with hub_client(paths) as client:
        renewer = Renewer(paths, client, every_s=0)
        assert renewer.check() is None  # fresh: not due
        ten_days_left = dt.datetime.now(dt.UTC) - dt.timedelta(days=80)
        old = _foreign_pair("east", load_ca(mutual.home), valid_from=ten_days_left, days=90)
        (paths.home / CLIENT_CERT).write_bytes(old[0])
        (paths.home / CLIENT_KEY).write_bytes(old[1])
        client.present(old)

        line = renewer.check()
        assert line is not None and "renewed" in line
        assert (paths.home / CLIENT_CERT).read_bytes() != old[0]
        assert client.work(0).kind == "idle"  # the same client, now with the new pair
        assert renewer.check() is None


def test_a_renewal_for_another_name_is_refused(mutual: Mutual) -> None:
    csr = make_csr(ec.generate_private_key(ec.SECP256R1()), "east").decode()
    with hub_client(mutual.nodes["west"]) as client, pytest.raises(ConfigError, match="CN=west"):
        client.renew_certificate(csr)


def test_hub_tls_rotate_keeps_mutual_tls_working(mutual: Mutual) -> None:
    result = CliRunner().invoke(cli, ["hub", "tls", "rotate", "--home", str(mutual.home)])
    assert result.exit_code == 0, result.output
    hub = mutual.hub[-1]
    hub.process.send(signal.SIGTERM)
    hub.process.wait()
    mutual.hub.append(restart_hub(mutual.group, hub))
    with hub_client(mutual.nodes["east"]) as client:
        assert client.work(0).kind == "idle"
    mutual.refused(mutual.credential("east"), None, ForbiddenError)


# -- configuration ------------------------------------------------------------------------------


def test_mtls_is_turned_on_and_off_by_command_and_needs_https(tmp_path: Path) -> None:
    home = tmp_path / "hub"
    HubHome.init(home, "hub")
    runner = CliRunner()
    assert runner.invoke(cli, ["hub", "tls", "mtls", "on", "--home", str(home)]).exit_code == 0
    with HubHome.open(home) as hub:
        assert hub.paths.config.mtls == "required"
    served = runner.invoke(cli, ["hub", "serve", "--home", str(home), "--insecure-http"])
    assert served.exit_code != 0 and "mtls: required" in served.output
    assert runner.invoke(cli, ["hub", "tls", "mtls", "off", "--home", str(home)]).exit_code == 0
    with HubHome.open(home) as hub:
        assert hub.paths.config.mtls == "off"
