"""The login route against a guessing caller (issue 15 follow-up): the password check (scrypt,
~32 MiB and tens of ms) runs off the hub's event loop, and one address that keeps failing is
refused with 429 before any password is checked, while callers from other addresses log in."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
from fastapi.testclient import TestClient

from aipipe.errors import AuthError, ThrottledError
from aipipe.hub import people as people_module
from aipipe.hub.hub import Hub as HubHome
from aipipe.hub.login_guard import LIMIT, WINDOW
from aipipe.hub.people import LOGIN_REFUSED, People
from aipipe.wire.people import TokenRequest
from tests.hub_support import Hub, running_hub, totp_now


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Hub]:
    with running_hub(tmp_path / "hub") as hub:
        yield hub


def add_person(hub: Hub, name: str) -> dict[str, Any]:
    response = hub.client.post(
        "/v1/people", json={"name": name, "role": "scientist"}, headers=hub.admin
    )
    assert response.status_code == 200, response.text
    created: dict[str, Any] = response.json()
    return created


def body(who: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    code = totp_now(who["totp_uri"])
    return {"person": who["name"], "password": who["password"], "totp": code, **overrides}


def test_the_password_is_checked_off_the_event_loop(
    hub: Hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice = add_person(hub, "alice")
    on_loop: list[bool] = []
    check = people_module.verify_password

    def watched(password: str, stored: str | None) -> bool:
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:
            on_loop.append(False)
        return check(password, stored)

    monkeypatch.setattr(people_module, "verify_password", watched)

    assert hub.client.post("/v1/auth/token", json=body(alice)).status_code == 200
    assert on_loop == [False]  # a worker thread: rounds and probes go on meanwhile


def test_an_address_that_keeps_failing_is_refused_before_its_password_is_checked(
    hub: Hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice = add_person(hub, "alice")
    # A spray: one guess at each of many names (no person reaches their own lock).
    for index in range(LIMIT):
        guess = body({**alice, "name": f"user{index}"}, password="Summer2026!")
        assert hub.client.post("/v1/auth/token", json=guess).status_code == 401
    checks: list[str] = []
    monkeypatch.setattr(people_module, "verify_password", lambda p, s: checks.append(p) or True)

    refused = hub.client.post("/v1/auth/token", json=body(alice))  # the right password and code

    assert refused.status_code == 429, refused.text
    assert refused.json()["error"] == ThrottledError.__name__
    assert 0 < int(refused.headers["Retry-After"]) <= WINDOW.total_seconds()
    assert checks == []  # no scrypt run for a throttled address
    (event,) = hub.events("auth.throttled")
    assert event.actor == "address/testclient" and event.details["failures"] == LIMIT
    # Alice, from her own address, is not locked out by the caller who sprayed.
    monkeypatch.undo()
    with TestClient(hub.client.app, client=("10.1.2.3", 50000)) as other:
        assert other.post("/v1/auth/token", json=body(alice)).status_code == 200


def test_successes_do_not_count_and_the_window_slides(hub: Hub) -> None:
    alice = add_person(hub, "alice")
    now = datetime.now(UTC)
    with HubHome(hub.paths) as local:
        people = People(local.store, local.audit, "test", now=lambda: now)

        async def login(**overrides: Any) -> str:
            request = TokenRequest(**body(alice, **overrides))
            try:
                await people.login(request, "192.0.2.7")
            except ThrottledError:
                return "throttled"
            except AuthError as exc:
                return str(exc)
            return "ok"

        async def scenario() -> list[str]:
            seen = [await login()]
            for index in range(LIMIT):
                seen.append(await login(person=f"nobody{index}"))
            seen.append(await login())
            return seen

        answers = anyio.run(scenario)
        assert answers[0] == "ok" and set(answers[1:-1]) == {LOGIN_REFUSED}
        assert answers[-1] == "throttled"

        now += WINDOW + timedelta(seconds=1)
        assert anyio.run(login) in ("ok", LOGIN_REFUSED)  # admitted again (the code may be spent)
        assert anyio.run(login) != "throttled"
