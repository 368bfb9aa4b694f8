"""Issue 9, items 9, 11, 12 and 13: enrolment, private homes, a declining node that must not
spin, and one `hub serve` per home (plus a clear line for a busy port)."""

from __future__ import annotations

import json
import socket
import sqlite3
import stat
import threading
import time
from pathlib import Path

import pytest

from aipipe.audit.log import AuditLog
from aipipe.errors import ConfigError, ConflictError
from aipipe.hub.enrolment import issue_token
from aipipe.hub.home import init_hub
from aipipe.node.client import HubClient
from aipipe.node.daemon import Daemon
from aipipe.node.home import init_node, open_audit, open_store
from aipipe.node.ingest import ingest_files
from aipipe.node.worker import NodeWorker
from aipipe.secure.identity import Identity
from aipipe.wire import EnrolToken
from tests.e2e_support import HEART, ProcessGroup, aipipe, start_hub
from tests.hub_support import STUDY, Hub


def _issue(hub: Hub, node: str, **options: object) -> EnrolToken:
    store = hub.paths.open_store()
    audit = AuditLog.open(hub.paths.audit_log, Identity.load(hub.paths.identity_key))
    try:
        return EnrolToken.decode(issue_token(store, audit, node, "http://testserver", **options))  # type: ignore[arg-type]
    finally:
        audit.close()
        store.close()


def _backdate_tokens(hub: Hub, when: str) -> None:
    """Make every token look issued (and, where recorded, due to expire) at `when`."""
    conn = sqlite3.connect(hub.paths.store)
    columns = {row[1] for row in conn.execute("PRAGMA table_info(enrol_tokens)")}
    conn.execute("UPDATE enrol_tokens SET created_at = ?", (when,))
    if "expires_at" in columns:
        conn.execute("UPDATE enrol_tokens SET expires_at = ?", (when,))
    conn.commit()
    conn.close()


# -- item 9: enrolment ------------------------------------------------------------------------


def test_a_token_issued_in_2000_is_refused_as_expired_and_audited(hub: Hub) -> None:
    token = hub.issue_token("alpha")
    _backdate_tokens(hub, "2000-01-01T00:00:00+00:00")

    response = hub.enrol_request(token, Identity.generate())

    assert response.status_code == 401
    assert "expired" in response.json()["detail"]
    assert "enrol-token --node alpha" in response.json()["detail"]
    refused = [e for e in hub.events("enrolment") if e.outcome == "refused"]
    assert refused and refused[-1].details["reason"] == "expired token"


def test_a_token_with_a_short_ttl_expires(hub: Hub) -> None:
    token = _issue(hub, "alpha", ttl_s=1)
    time.sleep(1.2)

    response = hub.enrol_request(token, Identity.generate())

    assert response.status_code == 401
    assert "expired" in response.json()["detail"]


def test_a_plain_token_for_an_enrolled_name_is_not_issued(hub: Hub) -> None:
    hub.enrol("alpha")

    with pytest.raises(ConflictError, match=r"already enrolled.*--replace"):
        hub.issue_token("alpha")


def test_a_plain_token_for_a_name_enrolled_meanwhile_does_not_displace_the_node(hub: Hub) -> None:
    alpha = hub.enrol("alpha")
    store = hub.paths.open_store()  # a token recorded without the issuing check (older hub)
    try:
        store.add_enrol_token("alpha", "x" * 43)
    finally:
        store.close()
    intruder = EnrolToken(hub_url="http://testserver", node="alpha", secret="x" * 43)

    response = hub.enrol_request(intruder, Identity.generate())

    assert response.status_code == 409
    assert "already enrolled" in response.json()["detail"]
    assert hub.client.get("/v1/work", headers=alpha.headers).status_code == 200


def test_re_enrolment_needs_replace_and_is_audited_as_such(hub: Hub) -> None:
    alpha = hub.enrol("alpha")
    identity = Identity.generate()

    response = hub.enrol_request(_issue(hub, "alpha", replace=True), identity)

    assert response.status_code == 200
    assert hub.client.get("/v1/work", headers=alpha.headers).status_code == 401
    fresh = {"Authorization": f"Bearer {response.json()['credential']}"}
    assert hub.client.get("/v1/work", headers=fresh).status_code == 200
    [event] = hub.events("node.re_enrolled")
    assert event.details["public_key"] == identity.public_hex
    assert event.details["previous_public_key"] == alpha.identity.public_hex
    issued = [e for e in hub.events("admin") if e.details.get("op") == "enrol-token"]
    assert issued[-1].details["replace"] is True


@pytest.mark.parametrize(
    "name", ["admin", "hub", "root", "system", "Admin", "a_b", "-alpha", "alpha-", "a.b", "x" * 64]
)
def test_reserved_and_malformed_node_names_get_no_token(hub: Hub, name: str) -> None:
    with pytest.raises(ConfigError, match="node name"):
        hub.issue_token(name)


def test_enrol_token_cli_takes_ttl_and_replace(tmp_path: Path) -> None:
    init_hub(tmp_path / "hub", "h")
    base = ("hub", "enrol-token", "--home", tmp_path / "hub", "--url", "http://h:1")

    ok = aipipe(*base, "--node", "alpha", "--ttl", "2h", "--json")
    bad = aipipe(*base, "--node", "alpha", "--ttl", "soon", check=False)

    assert EnrolToken.decode(json.loads(ok.stdout)["token"]).node == "alpha"
    assert json.loads(ok.stdout)["expires_at"]
    assert bad.returncode != 0 and "--ttl" in bad.stderr and "Traceback" not in bad.stderr


def test_node_init_force_carries_the_privacy_ledger(tmp_path: Path) -> None:
    from aipipe.privacy.ledger import BudgetLedger

    home = tmp_path / "node"
    paths = init_node(home, "alpha")
    store = open_store(paths)
    ledger = BudgetLedger(store.db)
    ledger.set_budget("chd", epsilon=2.0, delta=1e-5)
    step = {"noise_multiplier": 1.0, "sample_rate": 0.01, "steps": 100, "accountant": "rdp"}
    ledger.charge("chd", 1, **step)  # type: ignore[arg-type]
    spent = ledger.spent("chd")
    store.close()

    again = init_node(home, "alpha", force=True)

    store = open_store(again)
    try:
        carried = BudgetLedger(store.db)
        assert carried.spent("chd") == pytest.approx(spent)
        assert [e.round for e in carried.entries("chd")] == [1]
        assert carried.charge("chd", 1, **step).epsilon == pytest.approx(spent)  # type: ignore[arg-type]
    finally:
        store.close()
    with open_audit(again) as audit:
        [event] = [e for e in audit.events() if e.action == "node.ledger_carried"]
    assert event.details["studies"] == {"chd": 1}


# -- item 11: private homes -------------------------------------------------------------------


def _loose(home: Path) -> list[str]:
    """Everything under `home` that anyone but its owner could read or enter."""
    found = []
    for path in [home, *home.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        want = 0o700 if path.is_dir() else 0o600
        if mode & ~want & 0o777 or mode & (stat.S_IRWXG | stat.S_IRWXO):
            found.append(f"{path.relative_to(home.parent)} {mode:o}")
    return found


def test_node_home_is_private_after_init_and_ingest(tmp_path: Path) -> None:
    home = tmp_path / "node"
    paths = init_node(home, "alpha")
    assert _loose(home) == []

    store = open_store(paths)
    try:
        ingest_files(store, [HEART / "fhir" / "switzerland"])
        assert (home / "store.sqlite-wal").exists()
        assert _loose(home) == []
    finally:
        store.close()


def test_hub_home_is_private_after_init(tmp_path: Path) -> None:
    init_hub(tmp_path / "hub", "h")

    assert _loose(tmp_path / "hub") == []


# -- item 12: a node that has not approved a study does not spin ------------------------------


def test_a_node_that_has_not_approved_a_secure_study_polls_calmly(hub: Hub, tmp_path: Path) -> None:
    alpha, _, _ = hub.enrol("alpha"), hub.enrol("beta"), hub.enrol("gamma")
    hub.open_round(hub.publish({**STUDY, "name": "calm", "secure": "secagg", "min_nodes": 3}))
    paths = init_node(tmp_path / "alpha", "alpha")
    store, audit = open_store(paths), open_audit(paths)
    client = HubClient("http://testserver", token=alpha.credential, transport=hub.client._transport)
    polls: list[float] = []
    real_work = client.work

    def counted(wait_s: float, **kwargs: object) -> object:
        polls.append(wait_s)
        return real_work(wait_s, **kwargs)  # type: ignore[arg-type]

    client.work = counted  # type: ignore[method-assign]
    worker = NodeWorker("alpha", store, client, Identity.load(paths.identity_key), audit)
    lines: list[str] = []
    daemon = Daemon(worker, lines.append, poll_wait_s=0.5)
    threading.Timer(3.0, lambda: setattr(daemon, "stopping", True)).start()
    try:
        daemon.run(once=False)
    finally:
        store.close()
        audit.close()

    declined = [line for line in lines if "declined" in line]
    assert 1 <= len(declined) <= 2, lines
    assert len(polls) <= 12, f"{len(polls)} work polls in 3 s"


# -- item 13: one hub per home; a busy port ---------------------------------------------------


def test_a_second_hub_serve_on_a_served_home_exits_naming_the_first(tmp_path: Path) -> None:
    init_hub(tmp_path / "hub", "h")
    group = ProcessGroup(tmp_path / "logs")
    try:
        first = start_hub(group, tmp_path / "hub")
        served = (tmp_path / "hub" / "serve.json").read_text()

        second = aipipe(
            "hub", "serve", "--home", tmp_path / "hub", "--port", "0", check=False, timeout_s=60
        )

        assert second.returncode != 0
        assert str(first.process.pid) in second.stderr and first.url in second.stderr
        assert "Traceback" not in second.stderr
        assert (tmp_path / "hub" / "serve.json").read_text() == served
        assert _loose(tmp_path / "hub") == []
    finally:
        group.stop()


def test_hub_serve_on_a_busy_port_says_so_in_one_line(tmp_path: Path) -> None:
    init_hub(tmp_path / "hub", "h")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]

        result = aipipe(
            "hub", "serve", "--home", tmp_path / "hub", "--port", str(port), check=False
        )

    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if str(port) in line]
    assert lines and "in use" in lines[0]
    assert not (tmp_path / "hub" / "serve.json").exists()
