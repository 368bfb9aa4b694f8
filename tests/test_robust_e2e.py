"""A malicious institution among real processes (issue 14): a hub and two hospital nodes on
127.0.0.1 (`aipipe hub serve`, `aipipe node start` over their FHIR data) run a study with a
`detection:` block, and a third enrolled node, `mallory`, follows the protocol but sends a
model-replacement update: signed with its real key and credential, within the study's
`update_norm`, ten and more times longer than an honest one.

Its update is crafted here from its real node home (`NodeKeys`), not by a node daemon: the
attack harness is node-side and never part of a normal study. The hub flags it, audits it with
its numbers, leaves it out of the model, lowers its reputation under the study's floor, does
not select it for the next round (audited), and takes it back after `aipipe hub readmit`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from aipipe.wire.tensors import decode_arrays
from tests.e2e_support import (
    FRAME_HEADERS,
    Federation,
    NodeKeys,
    aipipe,
    aipipe_in_process,
    audit_events,
    frame,
    signed_update,
)

pytestmark = pytest.mark.e2e

HOSPITALS = ("switzerland", "va")  # the two smallest: quick to ingest and train
STUDY = "e2e-screened"
ATTACKER = "mallory"
ATTACK_NORM = 9.0  # under the study's bounds.update_norm (10): the hub takes it
DETECTION = {"threshold": 3.5, "exclude": True, "reputation_decay": 0.5, "reputation_floor": 0.6}


@dataclass
class Attack:
    fed: Federation
    keys: NodeKeys
    first: dict[str, Any]
    second: dict[str, Any]
    base: dict[str, np.ndarray[Any, Any]]
    result: dict[str, np.ndarray[Any, Any]]
    events: list[dict[str, Any]]


def enrol_attacker(fed: Federation) -> NodeKeys:
    """A node home for `mallory`, enrolled as any hospital is (it needs no data to attack)."""
    home = fed.root / ATTACKER
    issued = hub_json("enrol-token", "--home", fed.hub.home, "--node", ATTACKER, "--json")
    aipipe(
        "node", "init", "--home", home, "--name", ATTACKER, "--json",
        env={"AIPIPE_ENROL_TOKEN": issued["token"]},
    )  # fmt: skip
    return NodeKeys.load(home)


def hub_json(*args: str | Path) -> Any:
    """An admin's `aipipe hub ...` on the hub's home, run in this process (no torch import)."""
    return json.loads(aipipe_in_process("hub", *args).stdout)


def scaled_update(fed: Federation, keys: NodeKeys, number: int) -> bytes:
    """A signed update of norm ATTACK_NORM along a fixed direction, for round `number`."""
    info = fed.round(number, STUDY)
    base = decode_arrays(fed_get_bytes(fed, f"/v1/models/{info['base_version']}/weights"))
    rng = np.random.default_rng(7)
    direction = {k: rng.standard_normal(v.shape) for k, v in base.items()}
    norm = float(np.sqrt(sum(np.square(v).sum() for v in direction.values())))
    delta = {k: (ATTACK_NORM / norm * v).astype(np.float32) for k, v in direction.items()}
    digest = fed.get(f"/v1/studies/{STUDY}")["digest"]
    header, payload = signed_update(
        keys.identity,
        node=ATTACKER,
        study=STUDY,
        study_digest=digest,
        round=number,
        base_version=info["base_version"],
        delta=delta,
        num_examples=100,
    )
    return frame(header, payload)


def fed_get_bytes(fed: Federation, path: str) -> bytes:
    with fed.admin() as client:
        response = client.get(path)
    assert response.status_code == 200, response.text
    return response.content


@pytest.fixture(scope="module")
def attack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Attack]:
    root = tmp_path_factory.mktemp("robust")
    with Federation.running(root, sites=HOSPITALS) as fed:
        keys = enrol_attacker(fed)
        fed.publish(STUDY, deadline_s=90.0, secure={"detection": DETECTION})
        fed.start_daemons(*HOSPITALS)

        first = fed.open_round(study=STUDY)
        assert ATTACKER in first["selected"], first
        body = scaled_update(fed, keys, first["round"])
        response = httpx.post(
            f"{fed.hub.url}/v1/studies/{STUDY}/rounds/{first['round']}/updates",
            content=body,
            headers={**keys.headers, **FRAME_HEADERS},
            timeout=30,
            verify=fed.hub.verify,
        )
        assert response.status_code == 200, response.text
        first = fed.wait_for_round(first["round"], "closed", "failed", study=STUDY, timeout_s=120)
        base = decode_arrays(fed_get_bytes(fed, f"/v1/models/{first['base_version']}/weights"))
        result = decode_arrays(fed_get_bytes(fed, f"/v1/models/{first['result_version']}/weights"))

        second = fed.open_round(study=STUDY)
        second = fed.wait_for_round(second["round"], "closed", "failed", study=STUDY, timeout_s=120)
        events = audit_events(fed.hub.home, root / "hub-audit.jsonl")
        yield Attack(fed, keys, first, second, base, result, events)


def test_the_round_closes_with_the_hospitals_and_without_the_attacker(
    attack: Attack,
) -> None:
    assert attack.first["state"] == "closed", attack.first
    assert sorted(attack.first["reported"]) == sorted([*HOSPITALS, ATTACKER])
    model = attack.fed.get(f"/v1/models/{attack.first['result_version']}")
    assert sorted(c["node"] for c in model["contributors"]) == sorted(HOSPITALS)
    assert [c["node"] for c in model["excluded"]] == [ATTACKER]
    assert not any(c["flagged"] for c in model["contributors"])


def test_the_model_moves_like_an_honest_round_not_like_the_attack(attack: Attack) -> None:
    contributors = attack.fed.get(f"/v1/models/{attack.first['result_version']}")["contributors"]
    honest = max(c["update_norm"] for c in contributors)
    # FedAvg with the attacker folded in would have moved the model by about its weight share
    # of ATTACK_NORM, far more than any honest update: the attack matters here.
    share = 100 / (100 + sum(c["n"] for c in contributors))
    assert share * ATTACK_NORM > 10 * honest
    moved = float(
        np.sqrt(sum(np.square(attack.result[k] - attack.base[k]).sum() for k in attack.base))
    )
    assert moved <= honest * (1 + 1e-5)  # a weighted mean of the honest updates only


def test_the_attacker_is_flagged_and_audited_with_its_numbers(attack: Attack) -> None:
    flagged = [e for e in attack.events if e["action"] == "update.flagged"]
    assert [e["details"]["node"] for e in flagged] == [ATTACKER]
    details = flagged[0]["details"]
    assert details["round"] == attack.first["round"] and details["excluded"] is True
    assert details["norm"] == pytest.approx(ATTACK_NORM, rel=1e-4)
    assert max(details["z_norm"], details["z_distance"]) > DETECTION["threshold"]


def test_its_reputation_drops_and_it_sits_out_the_next_round(attack: Attack) -> None:
    nodes = {n["name"]: n for n in hub_json("nodes", "--home", attack.fed.hub.home, "--json")}
    assert nodes[ATTACKER]["reputation"] == 0.5 and nodes[ATTACKER]["flags"] == 1
    assert all(nodes[site]["reputation"] == 1.0 for site in HOSPITALS)
    assert attack.second["state"] == "closed", attack.second
    assert sorted(attack.second["selected"]) == sorted(HOSPITALS)
    excluded = [e for e in attack.events if e["action"] == "node.excluded"]
    assert [e["resource"] for e in excluded] == [f"node/{ATTACKER}"]
    assert excluded[0]["details"]["reputation"] == 0.5


def test_an_admin_readmits_it(attack: Attack) -> None:
    home = attack.fed.hub.home
    done = hub_json("readmit", "--home", home, "--node", ATTACKER, "--json")
    assert done == {"node": ATTACKER, "previous": 0.5, "reputation": 1.0}
    nodes = {n["name"]: n for n in hub_json("nodes", "--home", home, "--json")}
    assert nodes[ATTACKER]["reputation"] == 1.0
    out = attack.fed.root / "after-readmit.jsonl"
    readmitted = [e for e in audit_events(home, out) if e["action"] == "node.readmitted"]
    assert [json.dumps(e["details"], sort_keys=True) for e in readmitted] == [
        json.dumps({"previous": 0.5, "reputation": 1.0}, sort_keys=True)
    ]
