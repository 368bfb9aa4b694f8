"""The route × role table (issue 15): generated from the routes' `Allow`, printed in the README,
and checked here by calling every route of it with every role against an in-process hub.

A caller the table refuses gets 403 and an ``auth.refused`` audit event; a caller it allows
gets neither 401 nor 403 (a 404, 409 or 422 on the made-up path parameters is fine); a call
without a token gets 401 on every route that is not public. The cases come from the table
itself, so a new route is covered as soon as it exists.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from aipipe.hub.roles import PUBLIC, ROLES, RouteRoles, markdown_table
from aipipe.hub.routes import route_table
from tests.hub_support import Hub, running_hub

README = Path(__file__).resolve().parents[1] / "README.md"
TABLE = re.compile(r"<!-- route-table -->\n(.*?)\n<!-- /route-table -->", re.S)
PARAMS = {
    "study": "hub-test",
    "number": "1",
    "version": "made-up-version",
    "step": "keys",
    "name": "nobody",
    "token_id": "tok_made_up",
}
CALLERS = (*ROLES, "none")


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    with running_hub(tmp_path_factory.mktemp("roles") / "hub") as hub:
        yield hub


@pytest.fixture(scope="module")
def tokens(hub: Hub) -> dict[str, str | None]:
    """A bearer token per caller: the init admin token, a scientist's and an auditor's
    service tokens (issued through the admin route), the credential of a node that takes
    part in the study (its round 1 is open), and none."""
    issued = {}
    for role in ("scientist", "auditor"):
        body = {"name": f"test-{role}", "role": role}
        response = hub.client.post("/v1/tokens", json=body, headers=hub.admin)
        assert response.status_code == 200, response.text
        issued[role] = response.json()["token"]
    node, _ = hub.enrol("alpha"), hub.enrol("beta")
    hub.open_round(hub.publish())
    return {"admin": hub.admin_token, **issued, "node": node.credential, "none": None}


def _call(hub: Hub, row: RouteRoles, token: str | None) -> int:
    path = re.sub(r"\{(\w+)\}", lambda m: PARAMS[m.group(1)], row.path)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body: dict[str, str] | None = {} if row.method in ("POST", "PUT", "PATCH") else None
    response = hub.client.request(row.method, path, json=body, headers=headers)
    return int(response.status_code)


@pytest.mark.parametrize("row", route_table(), ids=lambda r: f"{r.method} {r.path}")
def test_every_route_answers_every_role_as_the_table_says(
    hub: Hub, tokens: dict[str, str | None], row: RouteRoles
) -> None:
    refused_before = len(hub.events("auth.refused"))
    statuses = {caller: _call(hub, row, tokens[caller]) for caller in CALLERS}

    expected_refusals = 0
    for caller, status in statuses.items():
        if row.roles is None:
            assert status not in (401, 403), (caller, status)
        elif caller == "none":
            assert status == 401, status
        elif caller in row.roles:
            assert status not in (401, 403), (caller, status)
        else:
            assert status == 403, (caller, status)
            expected_refusals += 1
    refused = hub.events("auth.refused")[refused_before:]
    assert len(refused) == expected_refusals
    assert {e.resource.split(" ")[0] for e in refused} <= {row.method}
    assert {e.actor.split("/")[0] for e in refused} == {
        c for c in ROLES if row.roles is not None and c not in row.roles
    }


def test_a_call_without_a_token_is_audited_with_its_reason(hub: Hub) -> None:
    before = len(hub.events("auth.failure"))

    assert hub.client.get("/v1/tokens").status_code == 401
    assert hub.client.get("/v1/tokens", headers={"Authorization": "Bearer nope"}).status_code == 401

    reasons = [e.details["reason"] for e in hub.events("auth.failure")[before:]]
    assert reasons == ["missing", "unknown"]


def test_openapi_json_is_in_the_table_for_people_only() -> None:
    (row,) = [r for r in route_table() if r.path == "/openapi.json"]

    assert row.roles is not None and set(row.roles) == {"admin", "scientist", "auditor"}


def test_the_readme_route_table_is_the_generated_one() -> None:
    """Regenerate it with: python -c "from aipipe.hub.routes import route_table;
    from aipipe.hub.roles import markdown_table; print(markdown_table(route_table()))" """
    found = TABLE.search(README.read_text())

    assert found is not None, "README.md lacks the <!-- route-table --> block"
    assert found.group(1).strip() == markdown_table(route_table())
    assert PUBLIC in found.group(1)
