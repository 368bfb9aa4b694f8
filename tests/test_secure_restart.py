"""A hub restarted in the middle of a SecAgg+ round rebuilds the round from its log and goes on.

Three nodes run the protocol by hand with the real `SecAggClient` against the real app
(TestClient, so the lifespan runs: store, audit, ticker). The hub is stopped and started again
at each stage boundary; the round must close with the FedAvg of the three contributions.
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from fastapi.testclient import TestClient

from aipipe.hub.app import create_app
from aipipe.hub.home import init_hub
from aipipe.secure.encoding import UpdateLayout, contribution, fixed_point_codec, mean_from_sum
from aipipe.secure.secagg import SecAggClient, SecAggConfig
from aipipe.wire import UpdateHeader
from aipipe.wire.secure import (
    SecAggAdvert,
    SecAggForwarded,
    SecAggNeighbourKeys,
    SecAggRoundConfig,
    SecAggShares,
    SecAggUnmask,
    SecAggUnmaskRequest,
)
from tests.e2e_support import frame, sign
from tests.hub_support import STUDY, Hub, Node, Round

NAMES = ("alpha", "beta", "gamma")
CLIP = 10.0


def secagg_path(at: Round, step: str) -> str:
    return f"/v1/studies/{at.study}/rounds/{at.number}/secagg/{step}"


class Party:
    """One node's side of the round, driven by the test."""

    def __init__(self, hub: Hub, node: Node, at: Round, roster: dict[str, bytes]) -> None:
        self.node, self.at = node, at
        raw = hub.client.get(secagg_path(at, "config"), headers=node.headers)
        assert raw.status_code == 200, raw.text
        message = SecAggRoundConfig.model_validate(raw.json())
        self.config = SecAggConfig(message.round_id, tuple(message.clients),
                                   message.vector_length, message.neighbours, message.threshold,
                                   message.bits)  # fmt: skip
        self.protocol = SecAggClient(
            config=self.config, client_id=node.name, identity=node.identity, roster=roster
        )

    def post(self, hub: Hub, step: str, body: Any) -> None:
        response = hub.client.post(
            secagg_path(self.at, step), content=body.model_dump_json(),
            headers={**self.node.headers, "Content-Type": "application/json"},
        )  # fmt: skip
        assert response.status_code == 200, response.text

    def fetch(self, hub: Hub, step: str) -> bytes:
        response = hub.client.get(
            secagg_path(self.at, step), params={"wait": 10}, headers=self.node.headers
        )
        assert response.status_code == 200, f"{step}: {response.status_code} {response.text}"
        return response.content

    def masked_update(self, x: npt.NDArray[np.float64], shares: SecAggForwarded) -> bytes:
        codec = fixed_point_codec(CLIP, len(self.config.clients), self.config.bits)
        masked = self.protocol.mask(shares.shares, codec.encode(x))
        header = UpdateHeader(
            node=self.node.name, study=self.at.study, study_digest=self.at.digest,
            round=self.at.number, base_version=self.at.base_version, secure="secagg",
            payload_sha256=hashlib.sha256(masked.data).hexdigest(), nonce=secrets.token_hex(16),
        )  # fmt: skip
        return frame(sign(self.node.identity, header), masked.data)


Weights = dict[str, npt.NDArray[Any]]


def run_round(tmp_path: Path, restart_after: str) -> tuple[dict[str, Any], Weights, Weights]:
    """Run a SecAgg+ round, restarting the hub after stage `restart_after`; return the round
    info, the new weights and the expected ones (plaintext FedAvg of the contributions)."""
    paths, token = init_hub(tmp_path / "hub", "test-hub")
    hubs: list[TestClient] = []

    def start() -> Hub:
        hubs.append(TestClient(create_app(paths)).__enter__())
        return Hub(hubs[-1], paths, token)

    def restart_if(stage: str, hub: Hub) -> Hub:
        if stage != restart_after:
            return hub
        hubs[-1].__exit__(None, None, None)
        return start()

    hub = start()
    try:
        nodes = [hub.enrol(name) for name in NAMES]
        at = hub.open_round(hub.publish({**STUDY, "secure": "secagg", "min_nodes": 3,
                                         "secure_options": {"update_clip": CLIP}}))  # fmt: skip
        roster = {n.name: n.identity.public_bytes for n in nodes}
        parties = [Party(hub, n, at, roster) for n in nodes]
        layout = UpdateLayout.of(at.base)
        rng = np.random.default_rng(0)
        xs = [contribution({k: rng.normal(0, 0.1, v.shape) for k, v in at.base.items()}, n,
                           layout=layout, update_clip=CLIP, max_examples=1000)
              for n in (30, 120, 250)]  # fmt: skip

        for party in parties:
            party.post(hub, "advert", SecAggAdvert(advert=party.protocol.advertise()))
        hub = restart_if("advertising", hub)
        for party in parties:
            keys = SecAggNeighbourKeys.model_validate_json(party.fetch(hub, "neighbour-keys"))
            party.post(hub, "shares", SecAggShares(reply=party.protocol.share_keys(keys.keys)))
        hub = restart_if("sharing", hub)
        for party, x in zip(parties, xs, strict=True):
            shares = SecAggForwarded.model_validate_json(party.fetch(hub, "forwarded-shares"))
            assert hub.upload(party.node, at, party.masked_update(x, shares)).status_code == 200
        hub = restart_if("masking", hub)
        for party in parties:
            request = SecAggUnmaskRequest.model_validate_json(party.fetch(hub, "unmask-request"))
            party.post(hub, "unmask", SecAggUnmask(reply=party.protocol.unmask(request.request)))
        info = hub.round(at)
        got = hub.weights(info["result_version"]) if info["result_version"] else {}
    finally:
        hubs[-1].__exit__(None, None, None)
    weighted, examples = mean_from_sum(np.sum(xs, axis=0), layout=layout, max_examples=1000)
    expected = {k: at.base[k] + weighted[k] / examples for k in at.base}
    return info, got, expected


@pytest.mark.parametrize("stage", ["advertising", "sharing", "masking", "never"])
def test_a_secagg_round_survives_a_hub_restart_after_each_stage(tmp_path: Path, stage: str) -> None:
    info, got, expected = run_round(tmp_path, stage)

    assert info["state"] == "closed", info["reason"]
    assert info["reported"] == list(NAMES)
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, atol=1e-5)


def test_a_round_whose_log_does_not_replay_fails_and_the_hub_still_starts(tmp_path: Path) -> None:
    paths, token = init_hub(tmp_path / "hub", "test-hub")
    with TestClient(create_app(paths)) as client:
        hub = Hub(client, paths, token)
        nodes = [hub.enrol(name) for name in NAMES]
        at = hub.open_round(hub.publish({**STUDY, "secure": "secagg", "min_nodes": 3}))
        roster = {n.name: n.identity.public_bytes for n in nodes}
        party = Party(hub, nodes[0], at, roster)
        party.post(hub, "advert", SecAggAdvert(advert=party.protocol.advertise()))
    conn = sqlite3.connect(paths.store)
    with conn:
        conn.execute("UPDATE secagg_log SET body = ?", (b"{not json",))
    conn.close()

    with TestClient(create_app(paths)) as client:
        info = Hub(client, paths, token).round(at)

    assert info["state"] == "failed"
    assert "could not be rebuilt from its log" in info["reason"]
