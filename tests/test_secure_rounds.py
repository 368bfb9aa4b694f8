"""Faults in secure rounds: bad input and dropouts meet a refusal, a dropout, or a failed round.

The hub is the real FastAPI app in-process (TestClient over a home made by `init_hub`, with its
0.5 s deadline ticker). Nodes enrol with real Ed25519 identities and X25519 sealing keys and are
driven by hand with the real `SecAggClient` and `CkksContext`, sending the messages
`aipipe.node.secure_rounds` sends; a CKKS key holder runs the node's own `ckks_decrypt`. Where
the fault is the hub's (an unmask request or a CKKS sum a node must not answer), the node's
functions run against a hand-written stand-in for `HubClient`, and a control test beside each
shows that the stand-in's honest answer is accepted.

A stage closes when every member answered or at `secure_options.stage_timeout_s`. Scenarios
that need a dropout use a short timeout (`DROPOUT_STAGE_S`), run once per module, and wait on
the hub's long-poll, never on a bare sleep. Real processes and the happy path are
`test_secure_e2e.py`'s.
"""

from __future__ import annotations

import dataclasses
import hashlib
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import pytest
from httpx import Response
from pydantic import BaseModel

from aipipe.audit.log import AuditLog
from aipipe.node.client import HubClient
from aipipe.node.secure_rounds import checked_config, ckks_decrypt, secagg_round
from aipipe.node.training import TrainResult
from aipipe.node.vault import SecureVault
from aipipe.node.worker import NodeWorker
from aipipe.secure.ckks import (
    CkksContext,
    EncryptedVector,
    choose_ckks_params,
    seal_context,
    sum_encrypted,
)
from aipipe.secure.encoding import (
    FloatArray,
    contribution,
    fixed_point_codec,
    mean_from_sum,
)
from aipipe.secure.errors import SecAggProtocolError, SecureAggregationError
from aipipe.secure.identity import Identity
from aipipe.secure.sealedbox import x25519_public_bytes
from aipipe.secure.secagg import (
    KeyAdvertisement,
    MaskedInput,
    SecAggClient,
    SecAggConfig,
    SecAggServer,
    ShareKeysReply,
)
from aipipe.secure.secagg.crypto import advert_payload
from aipipe.store.node_store import NodeStore
from aipipe.study.spec import StudySpec, load_study
from aipipe.wire import (
    UpdateHeader,
    UpdateReceipt,
    WorkItem,
    pack_frame,
    unpack_frame,
)
from aipipe.wire.frames import MEDIA_TYPE
from aipipe.wire.secure import (
    CkksKeys,
    DecryptBundleHeader,
    DecryptedSum,
    Keyring,
    KeyringEntry,
    SealedContextWire,
    SecAggAdvert,
    SecAggForwarded,
    SecAggNeighbourKeys,
    SecAggRoundConfig,
    SecAggShares,
    SecAggUnmask,
    SecAggUnmaskRequest,
    ckks_keys_payload,
)
from aipipe.wire.tensors import decode_arrays, encode_arrays
from tests.e2e_support import frame, sign, signed_update, wait_until
from tests.hub_support import Arrays, Hub, Node, Round, running_hub

SecureMode = Literal["secagg", "ckks"]

HEART_STUDY = Path(__file__).resolve().parents[1] / "examples" / "heart-disease" / "study.yaml"
NAMES = ("node-a", "node-b", "node-c", "node-d")  # sorted: the hub orders clients by name
QUIET_STAGE_S = 60.0  # no stage of these tests should time out
DROPOUT_STAGE_S = 3.0  # a stage that must time out; ≫ the few ms a driven stage takes
WAIT_S = 20.0  # how long a test waits for a stage to time out before it gives up
CKKS_PRECISION = 1e-6


# -- the hub and its nodes --------------------------------------------------------------------


def secure_spec(
    name: str, mode: SecureMode, *, min_nodes: int = 3, stage_timeout_s: float = QUIET_STAGE_S
) -> dict[str, Any]:
    """The heart-disease study (logistic model, 15 values a contribution) made secure."""
    raw = load_study(HEART_STUDY).model_dump(mode="json")
    raw.update(name=name, secure=mode, min_nodes=min_nodes)
    raw["secure_options"] = {**raw["secure_options"], "stage_timeout_s": stage_timeout_s}
    return raw


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Hub]:
    with running_hub(tmp_path / "hub") as hub:
        yield hub


# -- what a node sends ------------------------------------------------------------------------


def secure_header(
    node: str, identity: Identity, at: Round, payload: bytes, mode: SecureMode
) -> UpdateHeader:
    """A masked input's or ciphertext's header, signed as `NodeWorker.signed_header` signs it."""
    header = UpdateHeader(
        node=node,
        study=at.study,
        study_digest=at.digest,
        round=at.number,
        base_version=at.base_version,
        secure=mode,
        payload_sha256=hashlib.sha256(payload).hexdigest(),
        nonce=secrets.token_hex(16),
    )
    return sign(identity, header)


def contribution_of(name: str, at: Round) -> FloatArray:
    """x = [r, r·clip(Δ)] of a small random update; sites differ in Δ and in n."""
    rng = np.random.default_rng(NAMES.index(name) + 1)
    delta = {k: rng.normal(0.0, 0.2, v.shape) for k, v in at.base.items()}
    return contribution(
        delta,
        40 + 60 * NAMES.index(name),
        layout=at.layout,
        update_clip=at.spec.bounds.update_norm,
        max_examples=at.spec.bounds.max_examples,
    )


def fedavg(at: Round, contributions: list[FloatArray]) -> Arrays:
    """Plaintext FedAvg (server lr 1) of exactly these contributions."""
    weighted, examples = mean_from_sum(
        np.sum(contributions, axis=0),
        layout=at.layout,
        max_examples=at.spec.bounds.max_examples,
    )
    return {k: at.base[k] + weighted[k] / examples for k in at.base}


@contextmanager
def node_worker(home: Path, name: str, identity: Identity, client: object) -> Iterator[NodeWorker]:
    """A `NodeWorker` with a real store, audit log and key vault, talking to `client`."""
    home.mkdir(parents=True)
    SecureVault.create_sealing_key(home / "sealing.key")
    store = NodeStore.open(home / "store.sqlite", b"")
    audit = AuditLog.open(home / "audit.sqlite", identity, owner=f"node/{name}")
    try:
        yield NodeWorker(
            name=name,
            store=store,
            client=cast(HubClient, client),
            identity=identity,
            audit=audit,
            vault=SecureVault(home / "sealing.key", home / "secure"),
        )
    finally:
        audit.close()
        store.close()


SMALL_MODEL: Arrays = {"bias": np.zeros(1, np.float32), "weight": np.zeros((1, 3), np.float32)}


# -- SecAgg+: the nodes' side, by hand --------------------------------------------------------


@dataclass
class SecAggParty:
    """The selected nodes of one SecAgg+ round, each step sent over HTTP in the order
    `aipipe.node.secure_rounds.secagg_round` sends it."""

    hub: Hub
    at: Round
    nodes: dict[str, Node]
    config: SecAggConfig
    clients: dict[str, SecAggClient]
    adverts: dict[str, KeyAdvertisement] = field(default_factory=dict)
    sent: dict[str, FloatArray] = field(default_factory=dict)

    @classmethod
    def join(cls, hub: Hub, at: Round, nodes: list[Node]) -> SecAggParty:
        """Each node fetches the round config, checks it against its study, and makes its keys."""
        first = nodes[0]
        keyring = Keyring.model_validate_json(
            hub.client.get("/v1/keyring", headers=first.headers).content
        )
        roster = {e.node: e.identity_key for e in keyring.nodes}
        clients, config = {}, None
        for node in nodes:
            response = hub.client.get(f"{at.path}/secagg/config", headers=node.headers)
            assert response.status_code == 200, response.text
            message = SecAggRoundConfig.model_validate_json(response.content)
            config = checked_config(at.spec, message, node.name, at.number, at.layout.size)
            clients[node.name] = SecAggClient(
                config=config, client_id=node.name, identity=node.identity, roster=roster
            )
        assert config is not None
        return cls(hub, at, {n.name: n for n in nodes}, config, clients)

    def post(self, name: str, step: str, message: BaseModel) -> Response:
        response: Response = self.hub.client.post(
            f"{self.at.path}/secagg/{step}",
            content=message.model_dump_json(),
            headers={**self.nodes[name].headers, "Content-Type": "application/json"},
        )
        return response

    def fetch(self, name: str, step: str, wait_s: float = WAIT_S) -> bytes:
        """Long-poll `step` until the stage before it closes (at once, or at its deadline)."""
        response: Response = self.hub.client.get(
            f"{self.at.path}/secagg/{step}",
            params={"wait": wait_s},
            headers=self.nodes[name].headers,
        )
        assert response.status_code == 200, (response.status_code, response.text)
        return response.content

    def advertise(self, *names: str) -> None:
        for name in names:
            self.adverts[name] = self.clients[name].advertise()
            response = self.post(name, "advert", SecAggAdvert(advert=self.adverts[name]))
            assert response.status_code == 200, response.text

    def share(self, *names: str) -> None:
        for name in names:
            response = self.post(name, "shares", SecAggShares(reply=self.share_reply(name)))
            assert response.status_code == 200, response.text

    def share_reply(self, name: str) -> ShareKeysReply:
        keys = SecAggNeighbourKeys.model_validate_json(self.fetch(name, "neighbour-keys"))
        return self.clients[name].share_keys(keys.keys)

    def masked(self, name: str) -> bytes:
        """The node's masked input y = x + masks, x recorded in `sent` (the node's own record)."""
        forwarded = SecAggForwarded.model_validate_json(self.fetch(name, "forwarded-shares"))
        x = self.sent[name] = contribution_of(name, self.at)
        options = self.at.spec.secure_options
        codec = fixed_point_codec(
            self.at.spec.bounds.update_norm, len(self.config.clients), options.bits
        )
        return self.clients[name].mask(forwarded.shares, codec.encode(x)).data

    def upload(self, name: str, payload: bytes) -> Response:
        node = self.nodes[name]
        header = secure_header(name, node.identity, self.at, payload, "secagg")
        return self.hub.upload(node, self.at, frame(header, payload))

    def mask(self, *names: str) -> None:
        for name in names:
            response = self.upload(name, self.masked(name))
            assert response.status_code == 200, response.text

    def complete(self) -> None:
        """Every node through every stage: the round closes with all of them."""
        names = list(self.nodes)
        self.advertise(*names)
        self.share(*names)
        self.mask(*names)
        self.unmask(*names)

    def unmask(self, *names: str) -> None:
        for name in names:
            request = SecAggUnmaskRequest.model_validate_json(self.fetch(name, "unmask-request"))
            reply = self.clients[name].unmask(request.request)
            response = self.post(name, "unmask", SecAggUnmask(reply=reply))
            assert response.status_code == 200, response.text


def secagg_party(
    hub: Hub, count: int, *, min_nodes: int = 3, stage_timeout_s: float = QUIET_STAGE_S
) -> SecAggParty:
    """A published `secure: secagg` study with `count` enrolled nodes and its first round open."""
    nodes = [hub.enrol(name) for name in NAMES[:count]]
    study = hub.publish(
        secure_spec("secagg-faults", "secagg", min_nodes=min_nodes, stage_timeout_s=stage_timeout_s)
    )
    return SecAggParty.join(hub, hub.open_round(study), nodes)


@pytest.fixture
def at_masking(hub: Hub) -> SecAggParty:
    """Three nodes that advertised and shared keys: the round waits for their masked inputs."""
    party = secagg_party(hub, 3)
    party.advertise(*party.nodes)
    party.share(*party.nodes)
    return party


def refusal(response: Response) -> str:
    assert response.status_code == 409, (response.status_code, response.text)
    detail: str = response.json()["detail"]
    return detail


# -- SecAgg+: dropouts ------------------------------------------------------------------------
#
# Each scenario waits out one stage deadline, so it runs once per module and its tests read
# what happened.


@dataclass
class Vanished:
    """A 4-node round in which node-d advertised keys, never shared them, and sent a masked
    input once the sharing stage had closed without it; the other three finished the round."""

    hub: Hub
    party: SecAggParty
    late: Response

    @property
    def survivors(self) -> list[str]:
        return list(NAMES[:3])


@pytest.fixture(scope="module")
def vanished(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Vanished]:
    with running_hub(tmp_path_factory.mktemp("vanished") / "hub") as hub:
        party = secagg_party(hub, 4, stage_timeout_s=DROPOUT_STAGE_S)
        survivors = NAMES[:3]
        party.advertise(*NAMES)
        party.share(*survivors)
        party.fetch("node-a", "forwarded-shares")  # answers once the sharing stage timed out
        late = party.upload("node-d", bytes(4 * party.config.vector_length))
        party.mask(*survivors)
        party.unmask(*survivors)
        yield Vanished(hub, party, late)


def test_a_node_that_advertises_keys_and_vanishes_is_dropped_and_the_others_close_the_round(
    vanished: Vanished,
) -> None:
    info = vanished.hub.round(vanished.party.at)

    assert info["state"] == "closed", info["reason"]
    assert info["reported"] == vanished.survivors


def test_the_model_after_a_dropout_is_fedavg_of_the_survivors_within_the_quantisation_error(
    vanished: Vanished,
) -> None:
    hub, party = vanished.hub, vanished.party
    at, sent = party.at, [party.sent[name] for name in vanished.survivors]

    got = hub.weights(hub.round(at)["result_version"])

    expected = fedavg(at, sent)
    options = at.spec.secure_options
    codec = fixed_point_codec(at.spec.bounds.update_norm, len(party.config.clients), options.bits)
    weight = float(np.sum([x[0] for x in sent]))
    # Decoding errs by ≤ e = n/(2·scale) on Σr and on each Σr·Δ_j, so the mean errs by
    # ≤ e·(1 + update_clip)/Σr to first order; 1e-6 covers the float32 weights.
    bound = 1.01 * codec.error_bound(len(sent)) * (1 + at.spec.bounds.update_norm) / weight + 1e-6
    for key in expected:
        assert np.max(np.abs(got[key] - expected[key])) <= bound, key
        assert not np.allclose(got[key], at.base[key]), key


def test_the_hub_audits_the_sharing_stage_with_the_node_that_vanished(vanished: Vanished) -> None:
    events = vanished.hub.events("round.stage")

    stages = {e.details["stage"]: dict(e.details) for e in events}
    assert stages["advertising"] == {"stage": "advertising", "nodes": 4, "dropped": []}
    assert stages["sharing"] == {"stage": "sharing", "nodes": 3, "dropped": ["node-d"]}


def test_a_masked_input_from_a_node_counted_as_dropped_is_refused(vanished: Vanished) -> None:
    detail = refusal(vanished.late)

    assert detail == "masked input is refused: node 'node-d' was counted as dropped before masking"


def test_a_masked_input_from_a_node_counted_as_dropped_is_audited_as_refused(
    vanished: Vanished,
) -> None:
    refused = vanished.hub.events("update.refused")

    assert [e.actor for e in refused] == ["node-d"]


@dataclass
class ShortOfMinNodes:
    """A 4-node round of a study with min_nodes=4 in which node-d never sent its masked input:
    t = 3 of 4 holders could recover the sum of the other three, but the study forbids it."""

    hub: Hub
    party: SecAggParty
    told: Response  # what node-a heard while it waited for its unmask request


@pytest.fixture(scope="module")
def short_of_min_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ShortOfMinNodes]:
    with running_hub(tmp_path_factory.mktemp("short") / "hub") as hub:
        party = secagg_party(hub, 4, min_nodes=4, stage_timeout_s=DROPOUT_STAGE_S)
        party.advertise(*NAMES)
        party.share(*NAMES)
        party.mask(*NAMES[:3])
        told = hub.client.get(  # a long-poll that answers when the masking stage ends
            f"{party.at.path}/secagg/unmask-request",
            params={"wait": WAIT_S},
            headers=party.nodes["node-a"].headers,
        )
        yield ShortOfMinNodes(hub, party, told)


REASON_SHORT = (
    "only 3 masked inputs; study 'secagg-faults' needs min_nodes=4, so the sum is not unmasked"
)


def test_too_few_masked_inputs_for_min_nodes_fail_the_round_with_a_reason(
    short_of_min_nodes: ShortOfMinNodes,
) -> None:
    info = short_of_min_nodes.hub.round(short_of_min_nodes.party.at)

    assert (info["state"], info["reason"]) == ("failed", REASON_SHORT)


def test_nodes_waiting_to_unmask_are_told_the_round_failed(
    short_of_min_nodes: ShortOfMinNodes,
) -> None:
    detail = refusal(short_of_min_nodes.told)

    assert detail == f"round 1 of 'secagg-faults' failed: {REASON_SHORT}"


def test_a_round_failed_for_too_few_masked_inputs_creates_no_model_version(
    short_of_min_nodes: ShortOfMinNodes,
) -> None:
    models = short_of_min_nodes.hub.models(short_of_min_nodes.party.at.study)

    assert [m["round"] for m in models] == [0]


def test_a_round_failed_for_too_few_masked_inputs_is_audited_with_its_reason(
    short_of_min_nodes: ShortOfMinNodes,
) -> None:
    events = short_of_min_nodes.hub.events("aggregate")

    assert [(e.outcome, e.details) for e in events] == [("failure", {"reason": REASON_SHORT})]


# -- SecAgg+: bad messages --------------------------------------------------------------------


def _signed_by_another_identity(party: SecAggParty, name: str) -> KeyAdvertisement:
    impostor = SecAggClient(
        config=party.config, client_id=name, identity=Identity.generate(), roster={}
    )
    return impostor.advertise()


def _unsigned(party: SecAggParty, name: str) -> KeyAdvertisement:
    return dataclasses.replace(party.clients[name].advertise(), signature=b"")


@pytest.mark.parametrize(
    "forge", [_signed_by_another_identity, _unsigned], ids=lambda f: f.__name__.strip("_")
)
def test_a_key_advert_not_signed_by_the_nodes_identity_is_refused_and_audited(
    hub: Hub, forge: Callable[[SecAggParty, str], KeyAdvertisement]
) -> None:
    party = secagg_party(hub, 3)
    advert = forge(party, "node-a")

    response = party.post("node-a", "advert", SecAggAdvert(advert=advert))

    reason = "advert: client 'node-a': key advertisement is not signed by its identity"
    assert refusal(response) == reason
    refused = hub.events("update.refused")
    assert [(e.actor, e.details["reason"]) for e in refused] == [("node-a", reason)]


def test_a_key_advertised_in_an_earlier_round_is_refused(hub: Hub) -> None:
    first = secagg_party(hub, 3)
    first.complete()
    assert hub.round(first.at)["state"] == "closed"
    study = hub.client.get(f"/v1/studies/{first.at.study}", headers=hub.admin).json()
    second = SecAggParty.join(hub, hub.open_round(study), list(first.nodes.values()))
    old, node = first.adverts["node-a"], first.nodes["node-a"]
    round_id = second.config.round_id
    payload = advert_payload(round_id, "node-a", old.c_public, old.s_public)
    reused = KeyAdvertisement(
        round_id, "node-a", old.c_public, old.s_public, node.identity.sign(payload)
    )

    response = second.post("node-a", "advert", SecAggAdvert(advert=reused))

    assert refusal(response) == (
        "advert: client 'node-a' reuses a public key seen in an earlier round; keys must be "
        "fresh per round"
    )


def _share_for_another_round(reply: ShareKeysReply) -> ShareKeysReply:
    other = dataclasses.replace(reply.shares[0], round_id="secagg-faults/7/0000")
    return dataclasses.replace(reply, shares=(other, *reply.shares[1:]))


def _reply_for_another_round(reply: ShareKeysReply) -> ShareKeysReply:
    return dataclasses.replace(reply, round_id="secagg-faults/7/0000")


@pytest.mark.parametrize(
    ("forge", "reason"),
    [
        (_share_for_another_round, "'node-a' sent a share labelled with another sender/round"),
        (_reply_for_another_round, "key shares is for round 'secagg-faults/7/0000', not"),
    ],
    ids=["one-share", "whole-reply"],
)
def test_key_shares_bound_to_another_round_are_refused(
    hub: Hub, forge: Callable[[ShareKeysReply], ShareKeysReply], reason: str
) -> None:
    party = secagg_party(hub, 3)
    party.advertise(*party.nodes)
    reply = forge(party.share_reply("node-a"))

    response = party.post("node-a", "shares", SecAggShares(reply=reply))

    assert refusal(response).startswith(f"shares: {reason}")


def test_a_masked_input_of_the_wrong_length_is_refused_with_its_length(
    at_masking: SecAggParty,
) -> None:
    short = at_masking.masked("node-a")[:-4]

    response = at_masking.upload("node-a", short)

    words = at_masking.config.vector_length
    assert refusal(response) == (
        f"masked input from 'node-a' has {len(short)} bytes; this round takes {words} words of "
        f"32 bits = {4 * words} bytes"
    )


def test_a_node_refused_for_a_wrong_length_can_still_send_its_masked_input(
    at_masking: SecAggParty,
) -> None:
    party, names = at_masking, list(at_masking.nodes)
    good = party.masked("node-a")
    refused = party.upload("node-a", good[:-4])

    accepted = party.upload("node-a", good)
    party.mask(*names[1:])
    party.unmask(*names)

    assert refused.status_code == 409
    assert accepted.status_code == 200, accepted.text
    info = party.hub.round(party.at)
    assert (info["state"], info["reported"]) == ("closed", names)


def _unmask_all_but_the_last(party: SecAggParty) -> str:
    """Every node but the last answers its unmask request; the last node's name."""
    *first, last = party.nodes
    party.unmask(*first)
    return last


def test_a_masked_input_outside_the_codecs_range_fails_the_round_at_unmasking(
    at_masking: SecAggParty,
) -> None:
    party = at_masking
    *honest, rogue = party.nodes
    party.mask(*honest)
    forwarded = SecAggForwarded.model_validate_json(party.fetch(rogue, "forwarded-shares"))
    words = np.full(party.config.vector_length, 2**31 + 2**20, np.uint32)  # ≈ −2^31: no clipped x
    assert party.upload(rogue, party.clients[rogue].mask(forwarded.shares, words).data).is_success
    last = _unmask_all_but_the_last(party)
    request = SecAggUnmaskRequest.model_validate_json(party.fetch(last, "unmask-request"))

    party.post(last, "unmask", SecAggUnmask(reply=party.clients[last].unmask(request.request)))

    info = party.hub.round(party.at)
    assert info["state"] == "failed"
    assert "sum exceeds the range of 3 clipped inputs" in info["reason"]


def test_an_unmask_share_outside_the_field_is_refused_and_audited(
    at_masking: SecAggParty,
) -> None:
    party = at_masking
    party.mask(*party.nodes)
    last = _unmask_all_but_the_last(party)
    request = SecAggUnmaskRequest.model_validate_json(party.fetch(last, "unmask-request"))
    reply = party.clients[last].unmask(request.request)
    corrupt = dataclasses.replace(reply.b_shares[0], data=b"\xff" * len(reply.b_shares[0].data))
    forged = dataclasses.replace(reply, b_shares=(corrupt, *reply.b_shares[1:]))

    detail = refusal(party.post(last, "unmask", SecAggUnmask(reply=forged)))

    assert f"'{last}' revealed a malformed b-share" in detail
    assert [e.actor for e in party.hub.events("update.refused")] == [last]
    assert party.hub.round(party.at)["state"] != "closed"


def test_a_plaintext_update_to_a_secagg_study_is_refused_and_audited(hub: Hub) -> None:
    party = secagg_party(hub, 3)
    node, at = party.nodes["node-a"], party.at
    header, payload = signed_update(
        node.identity,
        node=node.name,
        study=at.study,
        study_digest=at.digest,
        round=at.number,
        base_version=at.base_version,
        delta={k: np.full_like(v, 0.01) for k, v in at.base.items()},
    )

    response = hub.upload(node, at, frame(header, payload))

    reason = "study 'secagg-faults' takes secure: secagg updates; this one is none"
    assert refusal(response) == reason
    assert [e.details["reason"] for e in hub.events("update.refused")] == [reason]


# -- SecAgg+: what a node refuses to take part in ---------------------------------------------


def _config(spec: StudySpec, clients: int, **changes: Any) -> SecAggRoundConfig:
    """The config an honest hub announces for `clients` nodes, with `changes` made to it."""
    config = SecAggConfig.create(
        round_id=f"{spec.name}/1/{'0' * 16}",
        clients=[f"node-{letter}" for letter in "abcdef"[:clients]],
        vector_length=15,
    )
    fields = {
        "round_id": config.round_id,
        "clients": list(config.clients),
        "vector_length": config.vector_length,
        "neighbours": config.neighbours,
        "threshold": config.threshold,
        "bits": config.bits,
    }
    return SecAggRoundConfig.model_validate({**fields, **changes})


def test_a_round_config_that_matches_the_study_is_accepted() -> None:
    spec = StudySpec.model_validate(secure_spec("secagg-faults", "secagg"))
    message = _config(spec, 4)

    config = checked_config(spec, message, "node-a", 1, 15)

    assert (config.clients, config.threshold) == (tuple(message.clients), 3)


@pytest.mark.parametrize(
    ("clients", "changes", "min_nodes", "problem"),
    [
        (6, {"threshold": 4}, 3, "threshold t=4 is below 5"),
        (4, {"vector_length": 16}, 3, "its vectors are not 15 long"),
        (3, {}, 4, "it has fewer than min_nodes=4 nodes"),
    ],
    ids=["threshold-below-default", "wrong-vector-length", "fewer-than-min-nodes"],
)
def test_a_node_refuses_a_round_config_its_study_does_not_imply(
    clients: int, changes: dict[str, Any], min_nodes: int, problem: str
) -> None:
    spec = StudySpec.model_validate(secure_spec("secagg-faults", "secagg", min_nodes=min_nodes))
    message = _config(spec, clients, **changes)

    with pytest.raises(SecAggProtocolError) as refused:
        checked_config(spec, message, "node-a", 1, 15)

    assert str(refused.value) == f"refusing the hub's SecAgg+ round: {problem}"


class ScriptedSecAggHub:
    """Stands in for `HubClient` in `secagg_round`: a real `SecAggServer` and three other real
    clients, the last of which drops after key sharing. The hub then asks the node to unmask
    the sum of the three inputs left, whatever the study's min_nodes says."""

    def __init__(self, config: SecAggConfig, me: str, identities: dict[str, Identity]) -> None:
        self.config, self.me = config, me
        self.roster = {n: i.public_bytes for n, i in identities.items()}
        self.server = SecAggServer(config=config, roster=self.roster)
        self.others = {
            n: SecAggClient(config=config, client_id=n, identity=identities[n], roster=self.roster)
            for n in config.clients
            if n != me
        }
        self.gone = config.clients[-1]
        self.posted: list[str] = []

    def model_weights(self, version: str) -> bytes:
        return encode_arrays(SMALL_MODEL)

    @contextmanager
    def retrying_until(self, until: float) -> Iterator[None]:
        yield

    def keyring(self) -> Keyring:
        return Keyring(nodes=[KeyringEntry(node=n, identity_key=k) for n, k in self.roster.items()])

    def secagg_config(self, study: str, number: int) -> SecAggRoundConfig:
        c = self.config
        return SecAggRoundConfig(
            round_id=c.round_id,
            clients=list(c.clients),
            vector_length=c.vector_length,
            neighbours=c.neighbours,
            threshold=c.threshold,
            bits=32,
        )

    def secagg_post(self, study: str, number: int, step: str, message: Any) -> None:
        self.posted.append(step)
        if step == "advert":
            self.server.receive_advertisement(message.advert)
        elif step == "shares":
            self.server.receive_shares(message.reply)

    def secagg_wait(self, study: str, number: int, step: str, model: Any, *, until: float) -> Any:
        server, others = self.server, self.others
        if step == "neighbour-keys":
            for client in others.values():
                server.receive_advertisement(client.advertise())
            server.close_advertising()
            return SecAggNeighbourKeys(keys=server.neighbour_keys(self.me))
        if step == "forwarded-shares":
            for name, client in others.items():
                server.receive_shares(client.share_keys(server.neighbour_keys(name)))
            server.close_sharing()
            return SecAggForwarded(shares=server.forwarded_shares(self.me))
        zeros = np.zeros(self.config.vector_length, np.uint32)
        for name, client in others.items():
            if name != self.gone:
                server.receive_masked_input(client.mask(server.forwarded_shares(name), zeros))
        server.close_masking()
        return SecAggUnmaskRequest(request=server.unmask_request(self.me))

    def upload(self, study: str, number: int, body: bytes) -> UpdateReceipt:
        _, payload = unpack_frame(body)
        self.server.receive_masked_input(MaskedInput(self.config.round_id, self.me, payload))
        return UpdateReceipt(accepted=True, round_state="collecting")


def _train() -> TrainResult:
    delta = {k: np.full(v.shape, 0.01, np.float32) for k, v in SMALL_MODEL.items()}
    return TrainResult(
        weights=SMALL_MODEL,
        delta=delta,
        num_examples=50,
        steps=1,
        loss=0.0,
        update_norm=0.02,
        epsilon_round=None,
        noise_multiplier=None,
        sample_rate=None,
    )


def _secagg_round_losing_one_of_four(
    tmp_path: Path, min_nodes: int
) -> tuple[Any, ScriptedSecAggHub]:
    """(what `secagg_round` returned or raised, the hub) for a 4-node round losing one node."""
    spec = StudySpec.model_validate(secure_spec("secagg-faults", "secagg", min_nodes=min_nodes))
    identities = {n: Identity.generate() for n in NAMES}
    config = SecAggConfig.create(
        round_id=f"{spec.name}/1/{'0' * 16}", clients=list(NAMES), vector_length=5
    )
    scripted = ScriptedSecAggHub(config, "node-a", identities)
    item = WorkItem(
        kind="train",
        study=spec.name,
        study_digest="d" * 64,
        round=1,
        version="b" * 64,
        deadline="2999-01-01T00:00:00Z",
    )
    with node_worker(tmp_path / "node-a", "node-a", identities["node-a"], scripted) as worker:
        try:
            outcome: Any = secagg_round(worker, spec, item, _train, None)
        except SecureAggregationError as exc:
            outcome = exc
    return outcome, scripted


def test_a_node_answers_an_unmask_request_with_min_nodes_survivors(tmp_path: Path) -> None:
    outcome, scripted = _secagg_round_losing_one_of_four(tmp_path, min_nodes=3)

    assert outcome == "round 1: secagg update sent and unmasked with 3 survivors"
    assert scripted.posted == ["advert", "shares", "unmask"]


def test_a_node_refuses_to_unmask_a_sum_of_fewer_than_min_nodes_inputs(tmp_path: Path) -> None:
    outcome, scripted = _secagg_round_losing_one_of_four(tmp_path, min_nodes=4)

    assert isinstance(outcome, SecAggProtocolError)
    assert str(outcome) == (
        "the hub asks to unmask a sum of 3 inputs; study 'secagg-faults' needs min_nodes=4, "
        "so this node reveals nothing"
    )
    assert "unmask" not in scripted.posted


# -- CKKS: the hub refuses ciphertexts it cannot add ------------------------------------------


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


def new_context(nodes: int = 3) -> CkksContext:
    params = choose_ckks_params(max_abs_sum=nodes * 10.0, precision=1e-7, n_max=nodes)
    return CkksContext.generate(params)


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
    item = WorkItem.model_validate(hub.client.get("/v1/work", headers=node.headers).json())
    assert item.kind == "decrypt", item
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
    return WorkItem.model_validate(response.json())


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


# -- CKKS: a key holder refuses to decrypt a sum it cannot vouch for --------------------------


@dataclass
class CraftedHub:
    """Stands in for `HubClient` in `ckks_decrypt`: hands out one crafted bundle and keeps
    whatever decrypted sum the node posts back."""

    bundle: bytes
    roster: dict[str, bytes]
    answers: list[bytes] = field(default_factory=list)

    def ckks_bundle(self, study: str, number: int) -> bytes:
        return self.bundle

    def keyring(self) -> Keyring:
        return Keyring(nodes=[KeyringEntry(node=n, identity_key=k) for n, k in self.roster.items()])

    def ckks_decrypted(self, study: str, number: int, body: bytes) -> None:
        self.answers.append(body)


@dataclass
class Contribution:
    header: UpdateHeader
    ciphertext: bytes
    x: FloatArray


@dataclass
class KeyHolder:
    """Three sites' signed ciphertexts for round 1 of a CKKS study, and what a bundle holds."""

    tmp_path: Path
    at: Round
    context: CkksContext
    identities: dict[str, Identity]
    contributions: dict[str, Contribution]

    def bundle(self, total: bytes, names: list[str]) -> bytes:
        parts = [self.contributions[n] for n in names]
        head = DecryptBundleHeader(
            contributions=[p.header for p in parts],
            sizes=[len(total)] + [len(p.ciphertext) for p in parts],
        )
        return pack_frame(
            head.model_dump_json().encode(), total + b"".join(p.ciphertext for p in parts)
        )

    def true_sum(self, names: list[str]) -> bytes:
        vectors = [EncryptedVector.from_bytes(self.contributions[n].ciphertext) for n in names]
        return sum_encrypted(self.context.public(), vectors).to_bytes()

    def decrypt(self, bundle: bytes) -> tuple[Any, CraftedHub]:
        """(what `ckks_decrypt` returned or raised, the hub) for node-a given `bundle`."""
        roster = {n: i.public_bytes for n, i in self.identities.items()}
        hub = CraftedHub(bundle, roster)
        item = WorkItem(
            kind="decrypt",
            study=self.at.study,
            study_digest=self.at.digest,
            round=self.at.number,
            version=self.at.base_version,
        )
        home = self.tmp_path / f"node-a-{secrets.token_hex(4)}"
        with node_worker(home, "node-a", self.identities["node-a"], hub) as worker:
            assert worker.vault is not None
            worker.vault.save_context(self.at.study, self.context)
            try:
                outcome: Any = ckks_decrypt(worker, self.at.spec, item)
            except SecureAggregationError as exc:
                outcome = exc
        return outcome, hub


@pytest.fixture(scope="module")
def key_holder(tmp_path_factory: pytest.TempPathFactory) -> KeyHolder:
    spec = StudySpec.model_validate(secure_spec("ckks-faults", "ckks"))
    at = Round(spec.name, spec.digest(), 1, "b" * 64, dict(SMALL_MODEL), spec)
    context = new_context()
    identities = {n: Identity.generate() for n in NAMES[:3]}
    contributions = {}
    for name, identity in identities.items():
        x = contribution_of(name, at)
        ciphertext = context.encrypt(x).to_bytes()
        header = secure_header(name, identity, at, ciphertext, "ckks")
        contributions[name] = Contribution(header, ciphertext, x)
    return KeyHolder(tmp_path_factory.mktemp("ckks"), at, context, identities, contributions)


def test_a_key_holder_decrypts_the_true_sum_of_min_nodes_signed_contributions(
    key_holder: KeyHolder,
) -> None:
    names = list(NAMES[:3])

    outcome, hub = key_holder.decrypt(key_holder.bundle(key_holder.true_sum(names), names))

    assert outcome == "round 1: decrypted the sum of 3 contributions"
    head_json, values = unpack_frame(hub.answers[0])
    head = DecryptedSum.model_validate_json(head_json)
    assert head.contributors == names
    expected = np.sum([key_holder.contributions[n].x for n in names], axis=0)
    np.testing.assert_allclose(decode_arrays(values)["sum"], expected, atol=CKKS_PRECISION)


def test_a_key_holder_refuses_a_sum_of_fewer_than_min_nodes_contributions(
    key_holder: KeyHolder,
) -> None:
    names = list(NAMES[:2])

    outcome, hub = key_holder.decrypt(key_holder.bundle(key_holder.true_sum(names), names))

    assert isinstance(outcome, SecureAggregationError)
    assert str(outcome) == (
        "the hub's sum holds 2 signed contributions; study 'ckks-faults' needs min_nodes=3, "
        "so this node does not decrypt it"
    )
    assert hub.answers == []


def test_a_key_holder_refuses_one_nodes_ciphertext_passed_off_as_the_sum(
    key_holder: KeyHolder,
) -> None:
    names = list(NAMES[:3])
    lone = key_holder.contributions["node-b"].ciphertext

    outcome, hub = key_holder.decrypt(key_holder.bundle(lone, names))

    assert isinstance(outcome, SecureAggregationError)
    assert str(outcome) == "the hub's sum is not the sum of the signed contributions"
    assert hub.answers == []


def test_a_key_holder_refuses_a_sum_listing_one_contribution_twice(key_holder: KeyHolder) -> None:
    names = ["node-a", "node-b", "node-b"]

    outcome, hub = key_holder.decrypt(key_holder.bundle(key_holder.true_sum(names), names))

    assert isinstance(outcome, SecureAggregationError)
    assert str(outcome) == "'node-b' appears twice in the hub's sum"
    assert hub.answers == []
