"""People, TOTP logins and role-scoped API tokens at the hub (issue 15), over HTTP against an
in-process hub: stored hashed, expiry and revocation, replayed codes, lockout, no user
enumeration, and what a scientist's and an auditor's tokens may do."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest

from aipipe.errors import AuthError
from aipipe.hub.hub import Hub as HubHome
from aipipe.hub.people import LOGIN_REFUSED, People
from aipipe.store.hub_store import HubStore
from aipipe.wire.people import TokenRequest
from tests.hub_support import STUDY, Hub, running_hub, totp_now


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Hub]:
    with running_hub(tmp_path / "hub") as hub:
        yield hub


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def add_person(hub: Hub, name: str, role: str) -> dict[str, Any]:
    response = hub.client.post("/v1/people", json={"name": name, "role": role}, headers=hub.admin)
    assert response.status_code == 200, response.text
    created: dict[str, Any] = response.json()
    return created


def login(hub: Hub, person: dict[str, Any], **overrides: Any) -> Any:
    code = totp_now(person["totp_uri"])
    body = {"person": person["name"], "password": person["password"], "totp": code, **overrides}
    return hub.client.post("/v1/auth/token", json=body)


def service_token(hub: Hub, role: str, **extra: Any) -> dict[str, Any]:
    body = {"name": f"svc-{role}", "role": role, **extra}
    response = hub.client.post("/v1/tokens", json=body, headers=hub.admin)
    assert response.status_code == 200, response.text
    grant: dict[str, Any] = response.json()
    return grant


def reasons(hub: Hub) -> list[str]:
    return [e.details.get("reason", "") for e in hub.events("auth.failure")]


# -- logging in ---------------------------------------------------------------------------------


def test_a_person_logs_in_with_password_and_totp_for_a_token_of_their_role(hub: Hub) -> None:
    alice = add_person(hub, "alice", "scientist")
    assert alice["totp_uri"].startswith("otpauth://totp/")

    response = login(hub, alice)

    assert response.status_code == 200, response.text
    grant = response.json()
    assert grant["role"] == "scientist" and grant["token"].startswith("aipipe-scientist.")
    assert grant["expires_at"] is not None
    studies = hub.client.get("/v1/models", headers=bearer(grant["token"]))
    assert studies.status_code == 200
    assert [e.details["op"] for e in hub.events("token.issued")] == ["login"]


def test_a_totp_code_works_once(hub: Hub) -> None:
    alice = add_person(hub, "alice", "auditor")
    code = totp_now(alice["totp_uri"])

    first = login(hub, alice, totp=code)
    again = login(hub, alice, totp=code)

    assert first.status_code == 200
    assert again.status_code == 401
    assert again.json()["detail"] == LOGIN_REFUSED
    assert reasons(hub)[-1] == "totp-replayed"


def test_five_failures_lock_a_person_until_an_admin_unlocks(hub: Hub) -> None:
    alice = add_person(hub, "alice", "scientist")
    for _ in range(5):
        assert login(hub, alice, password="wrong").status_code == 401

    locked = login(hub, alice)  # the right password and code: still refused

    assert locked.status_code == 401 and locked.json()["detail"] == LOGIN_REFUSED
    assert reasons(hub)[-1] == "locked"
    assert [e.resource for e in hub.events("person.locked")] == ["person/alice"]
    unlocked = hub.client.post("/v1/people/alice/unlock", headers=hub.admin)
    assert unlocked.status_code == 200 and unlocked.json()["locked_at"] is None
    assert login(hub, alice).status_code == 200
    assert [e.actor for e in hub.events("person.unlocked")] == ["admin/bootstrap"]


def test_refused_logins_do_not_tell_which_part_was_wrong(hub: Hub) -> None:
    alice = add_person(hub, "alice", "scientist")

    answers = [
        login(hub, {**alice, "name": "mallory"}),
        login(hub, alice, password="wrong"),
        login(hub, alice, totp="abcdef"),
    ]

    assert {(a.status_code, a.json()["detail"]) for a in answers} == {(401, LOGIN_REFUSED)}
    assert reasons(hub) == ["unknown-person", "password", "totp"]
    assert "mallory" not in str([e.actor for e in hub.events("auth.failure")])


def test_a_person_gets_their_role_or_a_lesser_one_only(hub: Hub) -> None:
    alice = add_person(hub, "alice", "scientist")
    root = add_person(hub, "root", "admin")

    assert login(hub, alice, role="admin").status_code == 403
    lesser = login(hub, root, role="auditor")
    assert lesser.status_code == 200 and lesser.json()["role"] == "auditor"
    assert login(hub, alice, lifetime_s=13 * 3600).status_code == 422


def test_the_login_body_is_capped_before_it_is_read(hub: Hub) -> None:
    response = hub.client.post("/v1/auth/token", content=b"x" * (65 * 1024))

    assert response.status_code == 413


# -- tokens ------------------------------------------------------------------------------------


def test_tokens_are_stored_hashed_only(hub: Hub) -> None:
    grant = service_token(hub, "auditor")
    token = grant["token"].encode()

    def found() -> bool:
        files = [p for p in hub.paths.home.rglob("*") if p.is_file()]
        return any(token in p.read_bytes() for p in files)

    assert not found()
    with closing(hub.paths.open_store()) as store:
        assert hashlib.sha256(token).hexdigest() in {r["token_hash"] for r in store.api_tokens()}
        listed = hub.client.get("/v1/tokens", headers=hub.admin).json()
        assert "token_hash" not in listed[0] and grant["token"] not in str(listed)
        store.set_meta("planted", grant["token"])  # control: the search sees what is there
    assert found()


def test_a_revoked_token_is_refused_from_the_next_request(hub: Hub) -> None:
    grant = service_token(hub, "auditor")
    assert hub.client.get("/v1/nodes", headers=bearer(grant["token"])).status_code == 200
    used = hub.client.get("/v1/tokens", headers=hub.admin).json()
    assert [t["last_used"] is not None for t in used] == [True, True]  # bootstrap, svc-auditor

    revoked = hub.client.delete(f"/v1/tokens/{grant['id']}", headers=hub.admin)

    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    after = hub.client.get("/v1/nodes", headers=bearer(grant["token"]))
    assert after.status_code == 401 and "revoked" in after.json()["detail"]
    (event,) = [e for e in hub.events("auth.failure") if e.details.get("reason") == "revoked"]
    assert event.actor == f"token/{grant['id']}" and grant["token"] not in str(event.details)


def test_an_expired_token_is_refused(hub: Hub) -> None:
    token = "aipipe-auditor.expired-for-this-test"
    with closing(hub.paths.open_store()) as store:
        digest = hashlib.sha256(token.encode()).hexdigest()
        store.add_api_token(digest, role="auditor", name="old", expires_at="2020-01-01T00:00:00Z")

    response = hub.client.get("/v1/nodes", headers=bearer(token))

    assert response.status_code == 401 and "expired" in response.json()["detail"]
    assert reasons(hub)[-1] == "expired"


def test_a_login_token_lives_its_lifetime_and_no_longer(hub: Hub) -> None:
    alice = add_person(hub, "alice", "scientist")
    now = datetime.now(UTC)
    with HubHome(hub.paths) as local:
        people = People(local.store, local.audit, "test", now=lambda: now)
        request = TokenRequest(person="alice", password=alice["password"],
                               totp=totp_now(alice["totp_uri"]), lifetime_s=3600)  # fmt: skip
        grant = anyio.run(people.login, request, "test")

        now += timedelta(seconds=3599)
        assert people.authenticate(grant.token) is not None
        now += timedelta(seconds=1)
        with pytest.raises(AuthError, match="expired"):
            people.authenticate(grant.token)
    assert grant.expires_at is not None


def test_a_disabled_persons_tokens_are_refused(hub: Hub) -> None:
    alice = add_person(hub, "alice", "auditor")
    token = login(hub, alice).json()["token"]
    assert hub.client.get("/v1/nodes", headers=bearer(token)).status_code == 200

    assert hub.client.post("/v1/people/alice/disable", headers=hub.admin).status_code == 200

    assert hub.client.get("/v1/nodes", headers=bearer(token)).status_code == 401
    assert reasons(hub)[-1] == "disabled"


def test_the_init_admin_token_is_an_ordinary_revocable_token(hub: Hub) -> None:
    (bootstrap,) = hub.client.get("/v1/tokens", headers=hub.admin).json()
    assert bootstrap["name"] == "bootstrap" and bootstrap["expires_at"] is None
    other = service_token(hub, "admin")

    hub.client.delete(f"/v1/tokens/{bootstrap['id']}", headers=bearer(other["token"]))

    assert hub.client.get("/v1/tokens", headers=hub.admin).status_code == 401


def test_a_home_from_before_tokens_keeps_its_admin_token(tmp_path: Path) -> None:
    token = "aipipe-admin.legacy"
    store = HubStore.open(tmp_path / "hub.sqlite", tmp_path / "blobs")
    store.conn.execute("DELETE FROM api_tokens")
    store.set_meta("admin_token_hash", hashlib.sha256(token.encode()).hexdigest())
    store.close()

    store = HubStore.open(tmp_path / "hub.sqlite", tmp_path / "blobs")
    (row,) = store.api_tokens()
    store.close()

    assert (row["name"], row["role"]) == ("bootstrap", "admin")
    assert row["token_hash"] == hashlib.sha256(token.encode()).hexdigest()


# -- what each role may do ---------------------------------------------------------------------


def test_a_scientist_publishes_and_opens_a_round_but_lists_no_tokens(hub: Hub) -> None:
    hub.enrol("alpha"), hub.enrol("beta")
    scientist = bearer(login(hub, add_person(hub, "sam", "scientist")).json()["token"])

    published = hub.client.post("/v1/studies", json={"spec": STUDY}, headers=scientist)
    opened = hub.client.post(f"/v1/studies/{STUDY['name']}/rounds", json={}, headers=scientist)

    assert published.status_code == 200, published.text
    assert opened.status_code == 200, opened.text
    assert hub.client.get("/v1/tokens", headers=scientist).status_code == 403
    assert hub.client.post("/v1/people", json={"name": "eve", "role": "admin"},
                           headers=scientist).status_code == 403  # fmt: skip
    assert [e.actor for e in hub.events("auth.refused")] == ["scientist/sam"] * 2
    ops = {e.details["op"]: e.actor for e in hub.events("admin")}
    assert ops["publish"] == ops["open-round"] == "scientist/sam"  # who did it, not "admin"


def test_an_auditor_reads_rounds_and_models_but_no_weights_and_publishes_nothing(
    hub: Hub,
) -> None:
    hub.enrol("alpha"), hub.enrol("beta")
    study = hub.publish()
    hub.open_round(study)
    auditor = bearer(service_token(hub, "auditor")["token"])

    rounds = hub.client.get(f"/v1/studies/{study['name']}/rounds", headers=auditor)
    models = hub.client.get("/v1/models", headers=auditor)
    version = models.json()[0]["version"]

    assert rounds.status_code == 200 and len(rounds.json()) == 1
    assert models.status_code == 200
    assert hub.client.get(f"/v1/models/{version}", headers=auditor).status_code == 200
    assert hub.client.get(f"/v1/models/{version}/weights", headers=auditor).status_code == 403
    spec = {**STUDY, "name": "other"}
    assert hub.client.post("/v1/studies", json={"spec": spec}, headers=auditor).status_code == 403
    assert hub.client.get("/metrics", headers=auditor).status_code == 200
