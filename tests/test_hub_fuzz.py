"""A property-based fuzz of the hub's OpenAPI with schemathesis (issue 9: 0 server errors and
0 response-schema violations), as an unauthenticated caller, the admin and an enrolled node.

The hub runs as a real uvicorn server on 127.0.0.1 (port 0) in a thread, with a published
study, an open round and two enrolled nodes, so authenticated requests reach real handlers.
Every operation gets a bounded number of generated requests, valid and invalid ones; each
response is checked for 5xx, undocumented status codes, content types and its schema.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from aipipe.hub.app import create_app
from aipipe.hub.home import init_hub
from aipipe.secure.identity import Identity
from aipipe.wire import EnrolToken
from tests.hub_support import STUDY, Hub, enrol_request
from tests.live_server import serving

# Per operation, per generation mode, per caller: ~30 operations x 2 x 3 x this.
EXAMPLES = 6
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@dataclass(frozen=True)
class LiveHub:
    url: str
    admin: dict[str, str]
    node: dict[str, str]
    operations: list[Any]  # schemathesis APIOperations, loaded once for the three callers


def _prepare(url: str, admin: dict[str, str], issue: Callable[[str], str]) -> dict[str, str]:
    """Publish a study, enrol two nodes, open a round; return the first node's headers."""

    with httpx.Client(base_url=url, timeout=30) as client:
        assert client.post("/v1/studies", json={"spec": STUDY}, headers=admin).status_code == 200
        credentials = []
        for name in ("alpha", "beta"):
            body = enrol_request(EnrolToken.decode(issue(name)), Identity.generate(), None)
            response = client.post("/v1/enrol", json=body.model_dump())
            assert response.status_code == 200, response.text
            credentials.append(response.json()["credential"])
        opened = client.post(f"/v1/studies/{STUDY['name']}/rounds", json={}, headers=admin)
        assert opened.status_code == 200, opened.text
    return {"Authorization": f"Bearer {credentials[0]}"}


@pytest.fixture(scope="module")
def live_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveHub]:
    paths, token = init_hub(tmp_path_factory.mktemp("fuzz") / "hub", "fuzz-hub")
    admin = {"Authorization": f"Bearer {token}"}
    helper = Hub(None, paths, token)  # type: ignore[arg-type]  # only issues tokens
    app = create_app(paths)
    with serving(app) as port:
        url = f"http://127.0.0.1:{port}"
        node = _prepare(url, admin, lambda name: helper.issue_token(name).encode())
        schema = schemathesis.openapi.from_dict(app.openapi())
        operations = [result.ok() for result in schema.get_all_operations()]
        yield LiveHub(url, admin, node, operations)


def _fuzz(hub: LiveHub, headers: dict[str, str]) -> list[str]:
    """Every operation, valid and invalid requests; the failures, one line each."""
    failures: list[str] = []
    for operation in hub.operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                _fuzz_operation(operation, mode, hub.url, headers)
            except Unsatisfiable:  # nothing to negate in this operation
                continue
            except (Exception, BaseExceptionGroup) as exc:  # one report per operation, mode
                failures.append(f"{operation.label} [{mode.value}]: {_summary(exc)}")
    return failures


def _summary(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return "\n    ".join(lines[:12])


def _fuzz_operation(operation: Any, mode: Any, url: str, headers: dict[str, str]) -> None:
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Any) -> None:
        if isinstance(case.query, dict) and isinstance(case.query.get("wait"), int | float):
            case.query["wait"] = min(case.query["wait"], 0.05)  # long-polls: bound the time
        case.call_and_validate(base_url=url, headers=headers, checks=CHECKS, timeout=30)

    run()


@pytest.mark.parametrize("caller", ["anonymous", "admin", "node"])
def test_fuzzing_the_openapi_finds_no_server_error_or_schema_violation(
    live_hub: LiveHub, caller: str
) -> None:
    headers = {"anonymous": {}, "admin": live_hub.admin, "node": live_hub.node}[caller]

    failures = _fuzz(live_hub, headers)

    assert failures == [], "\n\n".join(failures)
