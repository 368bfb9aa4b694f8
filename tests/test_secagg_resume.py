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

import hashlib
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from aipipe.audit.log import AuditLog
from aipipe.errors import ConflictError, HubUnavailableError
from aipipe.hub.app import create_app
from aipipe.hub.home import init_hub
from aipipe.node.client import HubClient
from aipipe.node.round_state import RoundStateError, RoundStates
from aipipe.node.secure_rounds import secagg_round
from aipipe.node.vault import SecureVault
from aipipe.node.worker import NodeWorker
from aipipe.privacy.ledger import BudgetLedger
from aipipe.secure.encoding import fixed_point_codec
from aipipe.secure.identity import Identity
from aipipe.secure.secagg import SecAggClient, SecAggConfig
from aipipe.store.node_store import NodeStore
from aipipe.study.spec import StudySpec
from aipipe.wire import RoundWork, UpdateReceipt, unpack_frame
from aipipe.wire.secure import SecAggAdvert, SecAggShares, SecAggUnmask, SecAggUnmaskRequest
from aipipe.wire.tensors import decode_arrays
from tests.hub_support import Hub
from tests.secure_rounds_support import (
    NAMES,
    ScriptedSecAggHub,
    _train,
    fedavg,
    node_worker,
    refusal,
    secagg_party,
    secure_spec,
)

# -- the client's retry policy ---------------------------------------------------------------


def flaky_client(failures: int, then: int = 200) -> tuple[HubClient, list[float], list[int]]:
    """A HubClient whose hub refuses connections `failures` times, then answers `then`."""
    calls: list[int] = [0]
    sleeps: list[float] = []

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


# -- the node: a process that dies mid-round resumes it from its sealed state ------------------


class Crash(BaseException):
    """Not an Exception: like a killed process, nothing in the node handles it."""


class RestartingHub(ScriptedSecAggHub):
    """The scripted hub of `secure_rounds_support`, which a node process can die on: the node's
    message at `crash_at` reaches the hub, then the node dies before it learns so. A re-sent
    message must be the very same bytes (the real hub refuses anything else)."""

    def __init__(self, crash_at: str, *args: Any) -> None:
        super().__init__(*args)
        self.crash_at = crash_at
        self.received: dict[str, bytes] = {}
        self.frames: dict[str, bytes] = {}  # whole frames as uploaded
        self.waited: dict[str, Any] = {}

    def _arrived(self, step: str, body: bytes) -> bool:
        if step in self.received:
            assert self.received[step] == body, f"the node sent a different {step}"
            return False
        self.received[step] = body
        return True

    def _maybe_crash(self, step: str) -> None:
        if step == self.crash_at:
            self.crash_at = ""
            raise Crash(step)

    def secagg_post(self, study: str, number: int, step: str, message: Any) -> None:
        if self._arrived(step, message.model_dump_json().encode()):
            super().secagg_post(study, number, step, message)
        self._maybe_crash(step)

    def secagg_wait(self, study: str, number: int, step: str, model: Any, *, until: float) -> Any:
        if step not in self.waited:
            self.waited[step] = super().secagg_wait(study, number, step, model, until=until)
        return self.waited[step]

    def upload(self, study: str, number: int, body: bytes) -> UpdateReceipt:
        self.frames["masked"] = body
        if self._arrived("masked", unpack_frame(body)[1]):
            super().upload(study, number, body)
        self._maybe_crash("masked")
        return UpdateReceipt(accepted=True, round_state="collecting")

    def unmask(self, message: bytes) -> Any:
        """The others unmask too; the hub's sum of the survivors' inputs."""
        self.server.receive_unmask(SecAggUnmask.model_validate_json(message).reply)
        for name, client in self.others.items():
            if name != self.gone:
                self.server.receive_unmask(client.unmask(self.server.unmask_request(name)))
        return self.server.finish()


def restarting_round(crash_at: str) -> tuple[RestartingHub, StudySpec, RoundWork, Identity]:
    spec = StudySpec.model_validate(secure_spec("secagg-faults", "secagg", min_nodes=3))
    identities = {n: Identity.generate() for n in NAMES}
    config = SecAggConfig.create(
        round_id=f"{spec.name}/1/{'0' * 16}", clients=list(NAMES), vector_length=5
    )
    item = RoundWork(
        kind="train",
        study=spec.name,
        study_digest="d" * 64,
        round=1,
        version="b" * 64,
        deadline="2999-01-01T00:00:00Z",
    )
    hub = RestartingHub(crash_at, config, "node-a", identities)
    return hub, spec, item, identities["node-a"]


@contextmanager
def restarted_node(home: Path, identity: Identity, hub: Any, spec: StudySpec) -> Iterator[Any]:
    """The node's next process on the same home: the study approved, training counted."""
    store = NodeStore.open(home / "store.sqlite", b"")
    store.approve(spec.name, "d" * 64, spec.model_dump_json())
    audit = AuditLog.open(home / "audit.sqlite", identity, owner="node/node-a")
    worker = NodeWorker(
        name="node-a",
        store=store,
        client=hub,
        identity=identity,
        audit=audit,
        vault=SecureVault(home / "sealing.key", home / "secure"),
    )
    trained: list[int] = []

    def retrain(*_: Any) -> Any:  # this test has no patient data: the node's training stub
        trained.append(1)
        return _train()

    worker._retrain = retrain  # type: ignore[method-assign,assignment]
    try:
        yield worker, trained
    finally:
        audit.close()
        store.close()


@pytest.mark.parametrize("crash_at", ["advert", "shares", "masked", "unmask"])
def test_a_node_killed_mid_round_resumes_it_with_the_same_keys_and_messages(
    tmp_path: Path, crash_at: str
) -> None:
    """The node dies right after its message at `crash_at` reached the hub; its next process
    re-sends the very same bytes (RestartingHub checks), goes on, and the round's sum is the
    contribution it recorded. Past its masked input it does not train again."""
    hub, spec, item, identity = restarting_round(crash_at)
    home = tmp_path / "node-a"
    with node_worker(home, "node-a", identity, hub) as worker:
        with pytest.raises(Crash):
            secagg_round(worker, spec, item, _train, 0.5)
        assert worker.vault is not None
        (saved,) = RoundStates(worker.vault).pending()
    mode, sealed = stat.S_IMODE(saved.stat().st_mode), saved.read_bytes()
    with restarted_node(home, identity, hub, spec) as (worker, trained):
        outcome = worker.resume_secure_rounds()

    assert mode == 0o600
    assert b"advert" not in sealed and b"client" not in sealed  # sealed, not JSON in clear
    assert outcome == ["resumed round 1: secagg update sent and unmasked with 3 survivors"]
    assert not saved.exists()
    assert len(trained) == (1 if crash_at in ("advert", "shares") else 0)
    result = hub.unmask(hub.received["unmask"])
    codec = fixed_point_codec(spec.bounds.update_norm, len(NAMES), 32)
    total = codec.decode_sum(result.total, len(result.contributors))
    sent = home / "secure" / "sent" / spec.name / "round-1.safetensors"
    np.testing.assert_allclose(total, decode_arrays(sent.read_bytes())["x"], atol=1e-6)


def test_a_round_state_sealed_for_another_round_or_tampered_is_refused(tmp_path: Path) -> None:
    hub, spec, item, identity = restarting_round("shares")
    home = tmp_path / "node-a"
    with node_worker(home, "node-a", identity, hub) as worker:
        with pytest.raises(Crash):
            secagg_round(worker, spec, item, _train, 0.5)
        assert worker.vault is not None
        states = RoundStates(worker.vault)
        (saved,) = states.pending()
        moved = states.path(spec.name, 2)
        moved.write_bytes(saved.read_bytes())
        moved.chmod(0o600)
        tampered = bytearray(saved.read_bytes())
        tampered[-1] ^= 1
        saved.write_bytes(bytes(tampered))

        for path in (moved, saved):
            with pytest.raises(RoundStateError, match="cannot be opened"):
                states.load(path)


def test_a_node_that_died_before_masking_charges_its_retrained_input_once(
    tmp_path: Path,
) -> None:
    """The first training's input never left, so it was never charged; the retrained one that
    does leave is charged with its exact bytes, once (the ledger records what left)."""
    hub, spec, item, identity = restarting_round("shares")
    home = tmp_path / "node-a"
    with node_worker(home, "node-a", identity, hub) as worker:
        BudgetLedger(worker.store.db).set_budget(spec.name, epsilon=1.0, delta=1e-5)
        with pytest.raises(Crash):
            secagg_round(worker, spec, item, _train, 0.5, sigma=8.0)
        assert BudgetLedger(worker.store.db).entries(spec.name) == []
    with restarted_node(home, identity, hub, spec) as (worker, trained):
        rows = SimpleNamespace(y_train=[0] * 10_000, ids=["p1", "p2"])
        worker.features = lambda _: rows  # type: ignore[method-assign]
        worker.resume_secure_rounds()
        (entry,) = BudgetLedger(worker.store.db).entries(spec.name)

    assert trained == [1]
    assert (entry.round, entry.noise_multiplier) == (1, 8.0)
    assert entry.digest == hashlib.sha256(hub.frames["masked"]).hexdigest()
