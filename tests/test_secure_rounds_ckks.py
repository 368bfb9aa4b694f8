"""CKKS rounds at the hub: ciphertexts it cannot add are refused, and a key holder's decryption
closes the round (see tests/secure_rounds_support.py for how the hub and its nodes are driven).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from httpx import Response

from aipipe.node.secure_rounds import ckks_decrypt
from aipipe.secure.ckks import (
    CkksContext,
    EncryptedVector,
    seal_context,
)
from aipipe.secure.identity import Identity
from aipipe.secure.sealedbox import x25519_public_bytes
from aipipe.wire import (
    WORK_ITEM,
    RoundWork,
    WorkItem,
)
from aipipe.wire.frames import MEDIA_TYPE
from aipipe.wire.secure import (
    CkksKeys,
    Keyring,
    SealedContextWire,
    ckks_keys_payload,
)
from tests.e2e_support import frame, wait_until
from tests.hub_support import Hub, Node, Round, running_hub
from tests.secure_rounds_support import (
    DROPOUT_STAGE_S,
    NAMES,
    QUIET_STAGE_S,
    WAIT_S,
    contribution_of,
    fedavg,
    new_context,
    node_worker,
    refusal,
    secure_header,
    secure_spec,
)

# -- CKKS: the hub refuses ciphertexts it cannot add ------------------------------------------


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Hub]:
    with running_hub(tmp_path / "hub") as hub:
        yield hub


def ckks_keys(study: str, maker: Node, context: CkksContext, others: list[Node]) -> CkksKeys:
    """The key ceremony's output, as `ckks_keygen` makes it."""
    sealed = []
    for node in others:
        box = seal_context(
            context,
            study_id=study,
            recipient_id=node.name,
            recipient_public_key=x25519_public_bytes(node.sealing),
            sender=maker.identity,
        )
        sealed.append(SealedContextWire(**dataclasses.asdict(box)))
    public = context.public_bytes()
    return CkksKeys(
        generator=maker.name,
        fingerprint=context.fingerprint,
        public_context=public,
        signature=maker.identity.sign(ckks_keys_payload(study, context.fingerprint, public)),
        sealed=sealed,
    )


@dataclass
class CkksRound:
    at: Round
    nodes: list[Node]
    context: CkksContext

    def upload(self, hub: Hub, node: Node, vector: EncryptedVector) -> Response:
        payload = vector.to_bytes()
        header = secure_header(node.name, node.identity, self.at, payload, "ckks")
        return hub.upload(node, self.at, frame(header, payload))


def ckks_round_open(hub: Hub, stage_timeout_s: float = QUIET_STAGE_S) -> tuple[Round, list[Node]]:
    nodes = [hub.enrol(name) for name in NAMES[:3]]
    spec = secure_spec("ckks-faults", "ckks", stage_timeout_s=stage_timeout_s)
    return hub.open_round(hub.publish(spec)), nodes


def post_keys(hub: Hub, at: Round, maker: Node, keys: CkksKeys) -> Response:
    response: Response = hub.client.post(
        f"/v1/studies/{at.study}/ckks/keys",
        content=keys.model_dump_json(),
        headers={**maker.headers, "Content-Type": "application/json"},
    )
    return response


def past_key_ceremony(hub: Hub, stage_timeout_s: float = QUIET_STAGE_S) -> CkksRound:
    """A CKKS round past its key ceremony: the hub collects ciphertexts."""
    at, nodes = ckks_round_open(hub, stage_timeout_s)
    context = new_context()
    response = post_keys(hub, at, nodes[0], ckks_keys(at.study, nodes[0], context, nodes[1:]))
    assert response.status_code == 200, response.text
    assert hub.round(at)["stage"] == "collecting"
    return CkksRound(at, nodes, context)


@pytest.fixture
def collecting(hub: Hub) -> CkksRound:
    return past_key_ceremony(hub)


def test_ckks_keys_not_signed_by_the_generating_node_are_refused_and_audited(hub: Hub) -> None:
    at, nodes = ckks_round_open(hub)
    keys = ckks_keys(at.study, nodes[0], new_context(), nodes[1:])
    forged = keys.model_copy(update={"signature": Identity.generate().sign(b"something else")})

    response = post_keys(hub, at, nodes[0], forged)

    reason = "the public context is not signed by the generating node"
    assert refusal(response) == reason
    assert [e.details["reason"] for e in hub.events("update.refused")] == [reason]
    assert hub.round(at)["stage"] == "keys"


def test_a_ciphertext_under_another_context_is_refused_and_audited(
    hub: Hub, collecting: CkksRound
) -> None:
    node, at = collecting.nodes[1], collecting.at
    foreign = new_context().encrypt(contribution_of(node.name, at))  # same parameters, new key

    response = collecting.upload(hub, node, foreign)

    reason = refusal(response)
    assert reason.startswith(f"ciphertext made under context {foreign.fingerprint.hex()[:12]}")
    assert reason.endswith("refusing to mix contexts")
    assert [(e.actor, e.details["reason"]) for e in hub.events("update.refused")] == [
        (node.name, reason)
    ]
    assert hub.round(at)["reported"] == []


def test_a_ciphertext_of_the_wrong_length_is_refused(hub: Hub, collecting: CkksRound) -> None:
    node, at = collecting.nodes[1], collecting.at
    short = collecting.context.encrypt(contribution_of(node.name, at)[:-1])

    response = collecting.upload(hub, node, short)

    size = at.layout.size
    assert refusal(response) == f"ciphertext holds {size - 1} values; this model takes {size}"


def test_a_node_refused_for_a_foreign_ciphertext_can_still_send_its_own(
    hub: Hub, collecting: CkksRound
) -> None:
    node, at = collecting.nodes[1], collecting.at
    x = contribution_of(node.name, at)
    refused = collecting.upload(hub, node, new_context().encrypt(x))

    accepted = collecting.upload(hub, node, collecting.context.encrypt(x))

    assert refused.status_code == 409
    assert accepted.status_code == 200, accepted.text
    assert hub.round(at)["reported"] == [node.name]


# -- CKKS: a key holder's decryption closes the round ----------------------------------------


class HubAsSeenByNode:
    """The `HubClient` calls `ckks_decrypt` makes, sent to the in-process hub as `node`."""

    def __init__(self, hub: Hub, node: Node) -> None:
        self.hub, self.node = hub, node

    def ckks_bundle(self, study: str, number: int) -> bytes:
        url = f"/v1/studies/{study}/rounds/{number}/ckks/sum"
        response: Response = self.hub.client.get(url, headers=self.node.headers)
        assert response.status_code == 200, response.text
        return response.content

    def keyring(self) -> Keyring:
        response = self.hub.client.get("/v1/keyring", headers=self.node.headers)
        return Keyring.model_validate_json(response.content)

    def ckks_decrypted(self, study: str, number: int, body: bytes) -> None:
        response = self.hub.client.post(
            f"/v1/studies/{study}/rounds/{number}/ckks/decrypted",
            content=body,
            headers={**self.node.headers, "Content-Type": MEDIA_TYPE},
        )
        assert response.status_code == 200, response.text


def decrypt_as(hub: Hub, ckks: CkksRound, node: Node, home: Path) -> str:
    """`ckks_decrypt` run by key holder `node` for the work the hub offers it."""
    item = WORK_ITEM.validate_python(hub.client.get("/v1/work", headers=node.headers).json())
    assert isinstance(item, RoundWork) and item.kind == "decrypt", item
    with node_worker(home, node.name, node.identity, HubAsSeenByNode(hub, node)) as worker:
        assert worker.vault is not None
        worker.vault.save_context(ckks.at.study, ckks.context)
        return ckks_decrypt(worker, ckks.at.spec, item)


def test_a_ckks_round_decrypted_by_a_key_holder_makes_the_fedavg_model(
    hub: Hub, collecting: CkksRound, tmp_path: Path
) -> None:
    at = collecting.at
    sent = [contribution_of(node.name, at) for node in collecting.nodes]
    for node, x in zip(collecting.nodes, sent, strict=True):
        response = collecting.upload(hub, node, collecting.context.encrypt(x))
        assert response.status_code == 200, response.text

    decrypt_as(hub, collecting, collecting.nodes[0], tmp_path / "key-holder")

    info = hub.round(at)
    assert info["state"] == "closed", info["reason"]
    got, expected = hub.weights(info["result_version"]), fedavg(at, sent)
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=0, atol=1e-5)


def work_of(hub: Hub, node: Node, wait_s: float = 0) -> WorkItem:
    response = hub.client.get("/v1/work", params={"wait": wait_s}, headers=node.headers)
    return WORK_ITEM.validate_python(response.json())


def all_sent(hub: Hub, ckks: CkksRound) -> None:
    for node in ckks.nodes:
        x = contribution_of(node.name, ckks.at)
        assert ckks.upload(hub, node, ckks.context.encrypt(x)).status_code == 200


def test_only_the_designated_key_holder_is_asked_to_decrypt(
    hub: Hub, collecting: CkksRound
) -> None:
    first, second, _ = collecting.nodes
    all_sent(hub, collecting)

    bundle = hub.client.get(f"{collecting.at.path}/ckks/sum", headers=second.headers)

    assert work_of(hub, first).kind == "decrypt"
    assert work_of(hub, second).kind == "idle"
    assert "is decrypted by 'node-a', not 'node-b'" in refusal(bundle)


def test_a_key_holder_that_does_not_decrypt_in_time_hands_over_to_the_next(
    hub: Hub, tmp_path: Path
) -> None:
    ckks = past_key_ceremony(hub, stage_timeout_s=DROPOUT_STAGE_S)
    first, second, _ = ckks.nodes
    all_sent(hub, ckks)
    assert work_of(hub, first).kind == "decrypt"  # ... and node-a never answers

    handed_over = wait_until(
        lambda: work_of(hub, second, wait_s=1).kind == "decrypt",
        what="node-b to be asked to decrypt",
        timeout_s=WAIT_S,
    )
    decrypt_as(hub, ckks, second, tmp_path / "node-b")

    assert handed_over and hub.round(ckks.at)["state"] == "closed"
    stages = [e.details for e in hub.events("round.stage") if e.details["stage"] == "decrypting"]
    assert stages == [{"stage": "decrypting", "nodes": 3, "dropped": ["node-a"]}]


def test_a_decrypted_sum_outside_the_range_of_clipped_contributions_fails_the_round(
    hub: Hub, collecting: CkksRound, tmp_path: Path
) -> None:
    at, (first, second, rogue) = collecting.at, collecting.nodes
    for node in (first, second):
        x = contribution_of(node.name, at)
        assert collecting.upload(hub, node, collecting.context.encrypt(x)).status_code == 200
    unclipped = np.full(at.layout.size, 50.0)  # r·Δ_j = 50 > update_clip = 10: no node sends it
    unclipped[0] = 0.5
    assert collecting.upload(hub, rogue, collecting.context.encrypt(unclipped)).status_code == 200

    decrypt_as(hub, collecting, first, tmp_path / "key-holder")

    assert hub.round(at)["state"] == "failed"
    assert [m["round"] for m in hub.models(at.study)] == [0]
