"""A SecAgg+ round outlives restarts (issue 9, item 5), in process:

- the node's `HubClient` retries an unreachable hub until a deadline, not ~7.5 s, and still
  stops at once on a refusal;
- the hub answers a node re-sending a message it already logged (the node lost the answer to a
  restart) with OK, also after the stage closed and after a hub restart, and still refuses a
  *different* message for a step the node answered;
- a node process that dies mid-round resumes it from its sealed state (the same keys, the same
  messages) and the round's sum is its contribution; the state file is sealed, 0600, and gone
  once the round ends.

Real processes are `test_secagg_hub_restart_e2e.py`'s.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from aipipe.errors import ConflictError, HubUnavailableError
from aipipe.hub.app import create_app
from aipipe.hub.home import init_hub
from aipipe.secure.secagg import SecAggClient
from aipipe.wire.secure import SecAggAdvert, SecAggShares, SecAggUnmask, SecAggUnmaskRequest
from tests.hub_support import Hub
from tests.test_secure_rounds import (
    fedavg,
    refusal,
    secagg_party,
)

# -- the client's retry policy ---------------------------------------------------------------


def flaky_client(failures: int, then: int = 200) -> tuple[Any, list[float], list[int]]:
    """A HubClient whose hub refuses connections `failures` times, then answers `then`."""
    from aipipe.node.client import HubClient

    calls, sleeps = [0], []

    def handler(request: httpx.Request) -> httpx.Response:
        calls[0] += 1
        if calls[0] <= failures:
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(then, json={"ok": True, "detail": "round 1 failed"})

    client = HubClient(
        "http://hub.invalid", transport=httpx.MockTransport(handler), sleep=sleeps.append
    )
    return client, sleeps, calls


def test_within_a_deadline_the_client_retries_a_hub_down_longer_than_the_old_7_5_s() -> None:
    client, sleeps, calls = flaky_client(failures=12)

    with client.retrying_until(time.monotonic() + 60):
        client.health()

    assert calls[0] == 13
    assert sum(sleeps) > 7.5
    assert max(sleeps) <= 2.0  # capped: the node is back soon after the hub


def test_without_a_deadline_the_client_gives_up_after_its_retries() -> None:
    client, _, calls = flaky_client(failures=12)

    with pytest.raises(HubUnavailableError):
        client.health()
    assert calls[0] == 5


def test_a_refusal_ends_the_retries_at_once() -> None:
    client, sleeps, calls = flaky_client(failures=1, then=409)

    with client.retrying_until(time.monotonic() + 60), pytest.raises(ConflictError):
        client.health()
    assert calls[0] == 2 and len(sleeps) == 1


def test_past_its_deadline_the_client_stops_retrying() -> None:
    client, _, calls = flaky_client(failures=100)

    with client.retrying_until(time.monotonic() - 1), pytest.raises(HubUnavailableError):
        client.health()
    assert calls[0] == 1


# -- the hub: an identical re-send is OK, a different one refused ------------------------------


class Hubs:
    """One hub home served in process, stopped and started again by `restart`."""

    def __init__(self, home: Path) -> None:
        self.paths, self.token = init_hub(home, "test-hub")
        self.client = TestClient(create_app(self.paths)).__enter__()
        self.hub = Hub(self.client, self.paths, self.token)

    def restart(self) -> Hub:
        self.client.__exit__(None, None, None)
        self.client = TestClient(create_app(self.paths)).__enter__()
        self.hub = Hub(self.client, self.paths, self.token)
        return self.hub


@pytest.fixture
def hubs(tmp_path: Path) -> Iterator[Hubs]:
    hubs = Hubs(tmp_path / "hub")
    try:
        yield hubs
    finally:
        hubs.client.__exit__(None, None, None)


def test_a_node_re_sending_its_advert_gets_ok_and_a_different_advert_is_refused(
    hubs: Hubs,
) -> None:
    party = secagg_party(hubs.hub, 3)
    names = list(party.nodes)
    party.advertise(*names)  # the stage closes: the round is sharing now
    again = party.post(names[0], "advert", SecAggAdvert(advert=party.adverts[names[0]]))
    other = SecAggClient(
        config=party.config,
        client_id=names[0],
        identity=party.nodes[names[0]].identity,
        roster={n.name: n.identity.public_bytes for n in party.nodes.values()},
    )
    different = party.post(names[0], "advert", SecAggAdvert(advert=other.advertise()))

    assert again.status_code == 200, again.text
    assert "already sent a different advert" in refusal(different)


def test_re_sent_shares_masked_inputs_and_unmask_replies_get_ok_across_a_hub_restart(
    hubs: Hubs,
) -> None:
    """Each node sends every message twice, the second time to a restarted hub after the stage
    closed; a different masked input is refused; the round closes with FedAvg of the three
    contributions, and a re-sent unmask reply after it closed is still OK."""
    party = secagg_party(hubs.hub, 3)
    names = list(party.nodes)
    party.advertise(*names)
    replies = {n: party.share_reply(n) for n in names}
    for name in names:
        assert party.post(name, "shares", SecAggShares(reply=replies[name])).status_code == 200
    masked = {n: party.masked(n) for n in names}
    frames = {}
    for name in names:
        response = party.upload(name, masked[name])
        frames[name] = response.request.content
        assert response.status_code == 200, response.text

    party.hub = hubs.restart()
    for name in names:
        again = party.post(name, "shares", SecAggShares(reply=replies[name]))
        assert again.status_code == 200, again.text
        assert party.hub.upload(party.nodes[name], party.at, frames[name]).status_code == 200
    different = party.upload(names[0], masked[names[1]])
    unmasks = {}
    for name in names:
        request = SecAggUnmaskRequest.model_validate_json(party.fetch(name, "unmask-request"))
        unmasks[name] = SecAggUnmask(reply=party.clients[name].unmask(request.request))
        assert party.post(name, "unmask", unmasks[name]).status_code == 200
    party.hub = hubs.restart()
    late = party.post(names[-1], "unmask", unmasks[names[-1]])
    info = party.hub.round(party.at)

    assert "already sent a different masked" in refusal(different)
    assert late.status_code == 200, late.text
    assert info["state"] == "closed", info["reason"]
    got = party.hub.weights(info["result_version"])
    expected = fedavg(party.at, [party.sent[n] for n in names])
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, atol=1e-5)
