"""Only the shared part of a personalized study is ever aggregated, in clear and in every secure
mode, and the node keeps the rest (`aipipe.personalization.parts`, `aipipe.node.personal_state`).

The hub is the real app in-process (tests/hub_support.py); secure rounds are driven by hand as
tests/secure_rounds_support.py drives them; the node side is a real `NodeWorker` with a real
store and audit log over a stand-in for the one `HubClient` call a round's training makes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aipipe.audit.log import AuditLog
from aipipe.hub.cds import HubCdsProvider
from aipipe.hub.personal import PERSONALIZED
from aipipe.hub.service import HubService
from aipipe.models.training import clip_update
from aipipe.node.personal_state import PersonalStates
from aipipe.node.sending import base_layout
from aipipe.node.worker import NodeWorker
from aipipe.personalization.parts import initial_weights
from aipipe.privacy.ledger import BudgetLedger
from aipipe.secure.identity import Identity
from aipipe.store.node_store import NodeStore
from aipipe.study.features import FeatureMatrix
from aipipe.study.preprocessing import Preprocessor
from aipipe.study.spec import StudySpec
from aipipe.wire import RoundWork, UpdateReceipt
from aipipe.wire.tensors import encode_arrays
from tests.hub_support import Arrays, Hub, Round, update
from tests.secure_rounds_support import (
    NAMES,
    SecAggParty,
    contribution_of,
    fedavg,
    new_context,
    node_worker,
    secure_spec,
)
from tests.test_secure_rounds_ckks import CkksRound, ckks_keys, decrypt_as, post_keys

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

BODY = ["body.0.bias", "body.0.weight"]
HEAD = ["head.bias", "head.weight"]


def fedper_spec(name: str, mode: str = "none", **changes: Any) -> dict[str, Any]:
    """The heart-disease study with an mlp whose body is federated and head kept (FedPer)."""
    raw = secure_spec(name, "secagg", min_nodes=3)
    raw.update(secure=mode, model={"kind": "mlp", "hidden": [4]})
    raw["personalization"] = {"method": "fedper"}
    raw.update(changes)
    return raw


def opened(hub: Hub, raw: dict[str, Any]) -> tuple[Round, list[Any]]:
    nodes = [hub.enrol(name) for name in NAMES[:3]]
    return hub.open_round(hub.publish(raw)), nodes


def body_of(weights: Arrays) -> Arrays:
    return {k: v for k, v in weights.items() if k.startswith("body.")}


def assert_only_the_body_moved(hub: Hub, at: Round, expected_body: Arrays) -> None:
    info = hub.round(at)
    assert info["state"] == "closed", info["reason"]
    new = hub.weights(info["result_version"])
    assert sorted(new) == BODY + HEAD
    for name in HEAD:  # the hub's head stays at its public seeded init
        np.testing.assert_array_equal(new[name], at.base[name])
    for name in BODY:
        np.testing.assert_allclose(new[name], expected_body[name], rtol=0, atol=1e-5)
        assert not np.allclose(new[name], at.base[name])


# -- the hub ------------------------------------------------------------------------------------


def test_fedper_with_a_logistic_model_is_refused_at_publish(hub: Hub) -> None:
    raw = fedper_spec("no-body", model={"kind": "logistic"})
    response = hub.client.post("/v1/studies", json={"spec": raw}, headers=hub.admin)
    assert response.status_code in (400, 409, 422), response.text
    assert "kind: mlp with hidden layers" in response.text


def test_version_0_holds_every_tensor_of_the_methods_architecture(hub: Hub) -> None:
    at, _ = opened(hub, fedper_spec("v0"))
    assert sorted(at.base) == BODY + HEAD
    expected = initial_weights(at.spec)
    assert all(np.array_equal(at.base[k], expected[k]) for k in expected)


def test_a_plain_fedper_round_changes_only_the_body_at_the_hub(hub: Hub) -> None:
    at, nodes = opened(hub, fedper_spec("plain-fedper"))
    scales, sizes = (0.1, -0.05, 0.2), (10, 30, 60)
    for node, scale, n in zip(nodes, scales, sizes, strict=True):
        delta = {k: np.full_like(v, scale) for k, v in body_of(at.base).items()}
        response = hub.upload(node, at, update(node, at, delta, n=n))
        assert response.status_code == 200, response.text

    mean = sum(s * n for s, n in zip(scales, sizes, strict=True)) / sum(sizes)
    assert_only_the_body_moved(hub, at, {k: v + mean for k, v in body_of(at.base).items()})


def test_an_update_carrying_the_head_is_refused_and_audited(hub: Hub) -> None:
    at, nodes = opened(hub, fedper_spec("head-sent"))
    whole = {k: np.full_like(v, 0.01) for k, v in at.base.items()}
    no_bias = {k: v for k, v in whole.items() if k == "body.0.weight"}

    sent_head = hub.upload(nodes[0], at, update(nodes[0], at, whole))
    lacking = hub.upload(nodes[1], at, update(nodes[1], at, no_bias))

    assert sent_head.status_code == 409
    assert "not shared: head.bias, head.weight" in sent_head.json()["detail"]
    assert lacking.status_code == 409
    assert "lacks shared tensors: body.0.bias" in lacking.json()["detail"]
    reasons = [e.details["reason"] for e in hub.events("update.refused")]
    assert [r for r in reasons if "head.bias, head.weight" in r]
    assert hub.round(at)["reported"] == []


def test_a_secagg_fedper_round_sums_only_the_body(hub: Hub) -> None:
    at, nodes = opened(hub, fedper_spec("masked-fedper", "secagg"))
    shared = dataclasses.replace(at, base=body_of(at.base))  # what a node lays out and sends
    party = SecAggParty.join(hub, shared, nodes)
    size = sum(v.size for v in body_of(at.base).values())
    assert party.config.vector_length == size + 1

    party.complete()

    expected = fedavg(shared, [party.sent[n.name] for n in nodes])
    assert_only_the_body_moved(hub, at, expected)


def test_a_ckks_fedper_round_sums_only_the_body(hub: Hub, tmp_path: Path) -> None:
    at, nodes = opened(hub, fedper_spec("sealed-fedper", "ckks"))
    context = new_context()
    keys = post_keys(hub, at, nodes[0], ckks_keys(at.study, nodes[0], context, nodes[1:]))
    assert keys.status_code == 200, keys.text
    shared = dataclasses.replace(at, base=body_of(at.base))
    ckks = CkksRound(shared, nodes, context)
    whole = dataclasses.replace(at, base=at.base)
    too_long = ckks.upload(hub, nodes[0], context.encrypt(contribution_of(nodes[0].name, whole)))
    size = sum(v.size for v in body_of(at.base).values()) + 1
    assert too_long.status_code == 409
    assert f"this model takes {size}" in too_long.json()["detail"]

    sent = [contribution_of(node.name, shared) for node in nodes]
    for node, x in zip(nodes, sent, strict=True):
        assert ckks.upload(hub, node, context.encrypt(x)).status_code == 200
    decrypt_as(hub, ckks, nodes[0], tmp_path / "key-holder")

    assert_only_the_body_moved(hub, at, fedavg(shared, sent))


def test_the_hub_withholds_cds_of_a_fedper_study_and_model_show_says_what_is_shared(
    hub: Hub,
) -> None:
    at, _ = opened(hub, fedper_spec("cds-fedper"))
    identity = Identity.load(hub.paths.identity_key)
    store = hub.paths.open_store()
    audit = AuditLog.open(hub.paths.audit_log, identity)
    try:
        provider = HubCdsProvider(HubService(hub.paths, store, audit, identity))
        assert provider.services() == []
        assert provider.withheld[at.study] == (at.base_version, PERSONALIZED)
    finally:
        audit.close()
        store.close()
    withheld = [e for e in hub.events("cds.withheld") if e.resource == f"study/{at.study}"]
    assert [e.details["reason"] for e in withheld] == [PERSONALIZED]

    info = hub.client.get(f"/v1/models/{at.base_version}", headers=hub.admin).json()
    assert info["personalization"] == {
        "method": "fedper",
        "shared": ["body.0.weight", "body.0.bias"],
        "local": ["head.weight", "head.bias"],
        "hub_cds": PERSONALIZED,
    }


# -- the node -----------------------------------------------------------------------------------


class _Weights:
    """The one `HubClient` call a round's training makes: the round's base model."""

    def __init__(self, weights: Arrays) -> None:
        self.blob = encode_arrays(weights)

    def model_weights(self, version: str) -> bytes:
        return self.blob


def _matrix(spec: StudySpec) -> FeatureMatrix:
    columns = spec.columns()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, len(columns))).astype(np.float32)
    y = (rng.random(64) > 0.5).astype(np.float32)
    return FeatureMatrix(columns, x, y, x, y, [], [], 64, Preprocessor({}, None, None))


def _item(spec: StudySpec, number: int) -> RoundWork:
    return RoundWork(
        kind="train", study=spec.name, round=number, version="b" * 64, study_digest="d" * 64
    )


def _round(worker: NodeWorker, spec: StudySpec, number: int, *, charged: bool = True) -> Arrays:
    """One round's training at the node; the state is kept once its update is charged."""
    item = _item(spec, number)
    result = worker._local_update(spec, item, _matrix(spec), None)
    assert sorted(clip_update(result, spec.bounds.update_norm).delta) == BODY
    if charged:
        worker.charge_release(spec, item, b"the round's frame")
    return result.delta


def _still(spec: StudySpec) -> StudySpec:
    """The study trained with a vanishing learning rate: the head stays where a round starts."""
    return spec.model_copy(update={"training": spec.training.model_copy(update={"lr": 1e-12})})


def test_the_node_keeps_its_head_across_rounds_and_a_reopened_store(tmp_path: Path) -> None:
    spec = StudySpec.model_validate(fedper_spec("node-fedper", privacy={"mode": "none"}))
    client = _Weights(initial_weights(spec))
    identity = Identity.generate()
    with node_worker(tmp_path / "n", "n", identity, client) as worker:
        worker.allow_non_private = True
        assert base_layout(worker, spec, _item(spec, 1)).size == 4 * 13 + 4 + 1
        _round(worker, spec, 1, charged=False)  # its update never left: no state kept
        assert PersonalStates(worker.store.db).latest(spec.name, "fedper") is None
        _round(worker, spec, 1)
        first = PersonalStates(worker.store.db).latest(spec.name, "fedper")
        assert first is not None and sorted(first.tensors) == HEAD
        planted = {k: np.full_like(v, 0.75) for k, v in first.tensors.items()}
        states = PersonalStates(worker.store.db)
        planted_sha = states.keep(spec.name, 1, "b" * 64, "fedper", planted)
        _round(worker, _still(spec), 2)  # starts from round 1's state
    store = NodeStore.open(tmp_path / "n" / "store.sqlite", b"")  # the node restarted
    try:
        second = PersonalStates(store.db).latest(spec.name, "fedper")
        assert second is not None and second.round == 2
        for name, value in planted.items():
            np.testing.assert_allclose(second.tensors[name], value, atol=1e-6)
    finally:
        store.close()
    with AuditLog.open(tmp_path / "n" / "audit.sqlite", None) as log:
        events = [e for e in log.events() if e.action == "personal.state"]
    assert [e.details["round"] for e in events] == [1, 2]
    assert events[0].details["started_from"] is None  # the hub's public head
    assert events[1].details["started_from"] == planted_sha
    assert events[-1].details["sha256"] == second.sha256
    assert all("tensors" not in e.details for e in events)
    with node_worker(tmp_path / "again", "n", identity, client) as fresh:
        fresh.store.close()
        fresh.store = NodeStore.open(tmp_path / "n" / "store.sqlite", b"")
        _round(fresh, _still(spec), 3)  # a reopened store: round 2's state
        third = PersonalStates(fresh.store.db).latest(spec.name, "fedper")
        assert third is not None and third.round == 3
        np.testing.assert_allclose(third.tensors["head.bias"], planted["head.bias"], atol=1e-6)
        fresh.store.close()


class _Hub(_Weights):
    """`HubClient` as a DP round's training and upload use it: weights in, frames recorded."""

    def __init__(self, weights: Arrays) -> None:
        super().__init__(weights)
        self.frames: list[bytes] = []

    def upload(self, study: str, number: int, frame: bytes) -> UpdateReceipt:
        self.frames.append(frame)
        return UpdateReceipt(accepted=True, round_state="collecting")


def test_a_round_offered_again_sends_the_same_bytes_and_leaves_the_state_alone(
    tmp_path: Path,
) -> None:
    privacy = {"mode": "dp", "epsilon": 1.0, "delta": 1e-5, "clip": 0.5, "accountant": "rdp"}
    training = {"rounds": 2, "local_steps": 2, "batch_size": 16, "lr": 0.05}  # σ in a blink
    raw = fedper_spec("resend-fedper", privacy=privacy, training=training)
    spec = StudySpec.model_validate(raw)
    hub = _Hub(initial_weights(spec))
    with node_worker(tmp_path / "n", "n", Identity.generate(), hub) as worker:
        worker.store.approve(spec.name, spec.digest(), spec.model_dump_json())
        BudgetLedger(worker.store.db).set_budget(spec.name, epsilon=1.0, delta=1e-5)
        worker._features[spec.name] = _matrix(spec)
        item = _item(spec, 1)

        worker._train(spec, item)
        first = PersonalStates(worker.store.db).latest(spec.name, "fedper")
        summary = worker._train(spec, item)  # the hub offers the round again

        again = PersonalStates(worker.store.db).latest(spec.name, "fedper")
        assert "sent the same update again" in summary
        assert len(hub.frames) == 2 and hub.frames[0] == hub.frames[1]
        assert first is not None and again is not None
        assert (again.round, again.sha256, again.time) == (first.round, first.sha256, first.time)
        kept = [e for e in worker.audit.events() if e.action == "personal.state"]
        assert len(kept) == 1
