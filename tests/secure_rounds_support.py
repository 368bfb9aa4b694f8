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

Shared by the secure-round test modules (test_secure_rounds_secagg, _ckks, _node) and by
test_secagg_resume and test_hardening_leaks: the hub fixture, the study, nodes driven by hand,
and stand-ins for `HubClient`.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
from httpx import Response
from pydantic import BaseModel

from aipipe.audit.log import AuditLog
from aipipe.models.training import TrainResult
from aipipe.node.client import HubClient
from aipipe.node.secagg_node import checked_config
from aipipe.node.vault import SecureVault
from aipipe.node.worker import NodeWorker
from aipipe.secure.ckks import CkksContext, choose_ckks_params
from aipipe.secure.encoding import (
    FloatArray,
    contribution,
    fixed_point_codec,
    mean_from_sum,
)
from aipipe.secure.identity import Identity
from aipipe.secure.secagg import (
    KeyAdvertisement,
    MaskedInput,
    SecAggClient,
    SecAggConfig,
    SecAggServer,
    ShareKeysReply,
)
from aipipe.store.node_store import NodeStore
from aipipe.study.spec import load_study
from aipipe.wire import (
    UpdateHeader,
    UpdateReceipt,
    unpack_frame,
)
from aipipe.wire.secure import (
    Keyring,
    KeyringEntry,
    SecAggAdvert,
    SecAggForwarded,
    SecAggNeighbourKeys,
    SecAggRoundConfig,
    SecAggShares,
    SecAggUnmask,
    SecAggUnmaskRequest,
)
from aipipe.wire.tensors import encode_arrays
from tests.e2e_support import frame, sign
from tests.hub_support import Arrays, Hub, Node, Round

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


def refusal(response: Response) -> str:
    assert response.status_code == 409, (response.status_code, response.text)
    detail: str = response.json()["detail"]
    return detail


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


def new_context(nodes: int = 3) -> CkksContext:
    params = choose_ckks_params(max_abs_sum=nodes * 10.0, precision=1e-7, n_max=nodes)
    return CkksContext.generate(params)
