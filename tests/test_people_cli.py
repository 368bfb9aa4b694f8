"""`aipipe hub user|token ...` on a hub home and `aipipe login` against a served hub (real
sockets: uvicorn on 127.0.0.1), through Typer's runner."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from aipipe.cli.app import app
from aipipe.hub.app import create_app
from aipipe.hub.home import init_hub
from tests.cli_support import assert_user_error, invoke, runner
from tests.hub_support import totp_now
from tests.live_server import serving


@dataclass(frozen=True)
class Served:
    home: Path
    url: str


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    paths, _ = init_hub(tmp_path / "hub", "cli-hub")
    with serving(create_app(paths)) as port:
        yield Served(paths.home, f"http://127.0.0.1:{port}")


def run_json(*args: str | Path) -> dict[str, object] | list[dict[str, object]]:
    result = invoke(*args, "--json")
    assert result.exit_code == 0, result.output
    data: dict[str, object] | list[dict[str, object]] = json.loads(result.stdout)
    return data


def status(served: Served, token: str, path: str = "/v1/nodes") -> int:
    response = httpx.get(served.url + path, headers={"Authorization": f"Bearer {token}"})
    return response.status_code


def test_a_person_added_on_the_hub_home_logs_in_with_aipipe_login(served: Served) -> None:
    added = run_json("hub", "user", "add", "alice", "--role", "auditor", "--home", served.home)
    assert isinstance(added, dict)
    code = totp_now(str(added["totp_uri"]))

    result = runner.invoke(
        app,
        ["login", "--hub", served.url, "--user", "alice", "--json"],
        input=f"{added['password']}\n{code}\n",
    )

    assert result.exit_code == 0, result.output
    grant = json.loads(result.stdout[result.stdout.index("{") :])
    assert grant["role"] == "auditor" and grant["name"] == "alice"
    assert status(served, grant["token"]) == 200
    assert status(served, grant["token"], "/v1/tokens") == 403
    (person,) = run_json("hub", "user", "list", "--home", served.home)
    assert isinstance(person, dict) and person["name"] == "alice" and person["locked_at"] is None


def test_service_tokens_are_issued_listed_and_revoked_from_the_home(served: Served) -> None:
    grant = run_json("hub", "token", "issue", "--home", served.home, "--role", "auditor",
                     "--name", "prometheus", "--expires", "30d")  # fmt: skip
    assert isinstance(grant, dict)
    token = str(grant["token"])
    assert status(served, token, "/metrics") == 200

    listed = run_json("hub", "token", "list", "--home", served.home)
    revoked = run_json("hub", "token", "revoke", str(grant["id"]), "--home", served.home)

    assert isinstance(listed, list)
    assert [t["name"] for t in listed] == ["bootstrap", "prometheus"]
    assert token not in json.dumps(listed)
    assert isinstance(revoked, dict) and revoked["revoked_at"] is not None
    assert status(served, token, "/metrics") == 401


def test_a_person_is_disabled_from_the_home_and_an_unknown_name_is_an_error(served: Served) -> None:
    run_json("hub", "user", "add", "bob", "--role", "scientist", "--home", served.home)

    disabled = run_json("hub", "user", "disable", "bob", "--home", served.home)

    assert isinstance(disabled, dict) and disabled["disabled_at"] is not None
    unknown = invoke("hub", "user", "unlock", "nobody", "--home", served.home)
    assert "no person named 'nobody'" in assert_user_error(unknown, 12)


def test_a_role_that_is_no_human_role_is_a_user_error(served: Served) -> None:
    result = invoke("hub", "user", "add", "eve", "--role", "node", "--home", served.home)

    assert "role" in assert_user_error(result, 2)
