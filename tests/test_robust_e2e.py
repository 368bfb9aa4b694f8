"""A malicious institution among real processes (issue 14): a hub and three node daemons on
127.0.0.1 (`aipipe hub serve`, `aipipe node start` over FHIR data), one of which, `mallory`, is
started with the hidden `--attack scale:10`: it trains honestly on its data (a copy of VA's
files), multiplies its update by ten (model replacement) and sends it signed with its real key,
within the study's `bounds.update_norm`, as the protocol asks.

The study aggregates with the coordinate-wise `median` and screens updates (`detection:` with
`exclude`). The hub flags mallory's update, audits it with its numbers, leaves it out of the
model, lowers mallory's reputation under the study's floor, does not select it for the next
round (audited), and takes it back after `aipipe hub readmit`.

The honest comparison for "the model keeps its accuracy": a twin study (`e2e-clean`, the same
fields under another name) whose first round was opened before mallory enrolled, so that only
the two hospitals take part in it. Both studies start from the same version-0 weights (the
public seeded init) and train without DP with full-batch SGD, so that an honest update is a
function of the site's data and the base alone: the twin's round 1 is the attacked round 1
without the attacker, with the very same honest updates (DP noise would make the two rounds
differ by more than the attack's effect on 61 test rows). Each hospital evaluates both results
on its own test split (the numbers stay on the node: the test reads them from the node's store);
the attacked model is the clean one (weights within 1e-5), and its accuracy pooled over the two
hospitals is within 2 points of the clean one's. FedAvg would have moved the model by about
mallory's share of its update (ten times VA's), several times any honest update.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aipipe.settings import load_node_config
from aipipe.wire.tensors import decode_arrays
from tests.e2e_support import (
    HEART,
    Federation,
    aipipe,
    aipipe_in_process,
    node_audit_events,
    wait_until,
)

pytestmark = pytest.mark.e2e

HOSPITALS = ("switzerland", "va")  # the two smallest: quick to ingest and train
STUDY, CLEAN = "e2e-screened", "e2e-clean"
ATTACKER, ATTACK, FACTOR = "mallory", "scale:10", 10.0
ATTACKER_DATA = HEART / "fhir" / "va"  # a copy of VA's files: a real site's size and data
DETECTION = {"threshold": 3.5, "exclude": True, "reputation_decay": 0.5, "reputation_floor": 0.6}
FIELDS = {
    "aggregation": {"name": "median"},
    "detection": DETECTION,
    "min_nodes": 2,
    # Plaintext full-batch SGD (no DP, as in tests/test_attack_node.py): an honest update is a
    # function of the site's data and the base model alone, so the twin study's round and the
    # attacked one get the very same honest updates. lr 0.5: one round learns; update_norm 100:
    # the node's clip leaves ten times an honest update (norm ~5) as it is.
    "training": {"rounds": 3, "local_steps": 10, "batch_size": 1000, "lr": 0.5},
    "privacy": {"mode": "none"},
    "bounds": {"update_norm": 100.0},
}


@dataclass
class Attack:
    fed: Federation
    first: dict[str, Any]
    clean: dict[str, Any]
    second: dict[str, Any]
    base: dict[str, np.ndarray[Any, Any]]
    result: dict[str, np.ndarray[Any, Any]]
    events: list[dict[str, Any]]


def hub_json(*args: str | Path) -> Any:
    """An admin's `aipipe hub ...` on the hub's home, run in this process (no torch import)."""
    return json.loads(aipipe_in_process("hub", *args).stdout)


def hub_audit(home: Path, out: Path) -> list[dict[str, Any]]:
    """The hub's audit events through `aipipe audit export`, run in this process (as
    `audit_events` does it in a subprocess, less an interpreter's start)."""
    aipipe_in_process("audit", "export", "--home", home, "--format", "jsonl", "--out", out)
    lines = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    return [line for line in lines if "checkpoint" not in line]


def weights(fed: Federation, version: str) -> dict[str, np.ndarray[Any, Any]]:
    with fed.admin() as client:
        response = client.get(f"/v1/models/{version}/weights")
    assert response.status_code == 200, response.text
    return decode_arrays(response.content)


def local_evaluation(home: Path, study: str, version: str) -> dict[str, Any] | None:
    """The node's own evaluation of `version` (`ModelLineage.evaluation`'s row), read-only
    from its store while its daemon runs."""
    store = load_node_config(home).store
    conn = sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=5)
    conn.row_factory = sqlite3.Row
    try:
        row = conn.execute(
            "SELECT n, accuracy, auc FROM local_evaluations WHERE study = ? AND version = ?",
            (study, version),
        ).fetchone()
    except sqlite3.OperationalError:  # the table is made on the node's first evaluation
        return None
    finally:
        conn.close()
    return None if row is None else dict(row)


def evaluations(fed: Federation, study: str, version: str) -> dict[str, dict[str, Any]]:
    """Each hospital's own evaluation of `version`, once both have made it."""

    def made() -> dict[str, dict[str, Any]] | None:
        rows = {site: local_evaluation(fed.nodes[site], study, version) for site in HOSPITALS}
        return rows if all(rows.values()) else None  # type: ignore[return-value]

    return wait_until(made, what=f"the hospitals to evaluate {version[:12]}", timeout_s=120,
                      context=fed.group.logs)  # fmt: skip


def start_attacker(fed: Federation) -> None:
    """Enrol mallory as any hospital is, ingest VA's files into its home, and start its daemon
    with the attack."""
    home = fed.nodes[ATTACKER] = fed.root / ATTACKER
    issued = hub_json("enrol-token", "--home", fed.hub.home, "--node", ATTACKER, "--json")
    aipipe("node", "init", "--home", home, "--name", ATTACKER, "--json", *fed.node_flags,
           env={"AIPIPE_ENROL_TOKEN": issued["token"]})  # fmt: skip
    aipipe("node", "ingest", "--home", home, ATTACKER_DATA, "--json")
    fed.start_daemons(ATTACKER, extra={ATTACKER: ("--attack", ATTACK)})


@pytest.fixture(scope="module")
def attack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Attack]:
    root = tmp_path_factory.mktemp("robust")
    with Federation.running(
        root, sites=HOSPITALS, study=CLEAN, study_fields=FIELDS,
        node_flags=("--allow-non-private",),
    ) as fed:  # fmt: skip
        clean = fed.open_round(study=CLEAN)  # before mallory exists: the hospitals only
        with ThreadPoolExecutor(max_workers=1) as pool:  # the hospitals train meanwhile
            started = pool.submit(start_attacker, fed)
            fed.start_daemons(*HOSPITALS)
            started.result()
        fed.publish(STUDY, deadline_s=90.0, secure=FIELDS)  # mallory's daemon sees it approved
        first = fed.open_round(study=STUDY)
        assert sorted(first["selected"]) == sorted([*HOSPITALS, ATTACKER]), first

        clean = fed.wait_for_round(clean["round"], "closed", "failed", study=CLEAN, timeout_s=120)
        first = fed.wait_for_round(first["round"], "closed", "failed", study=STUDY, timeout_s=120)
        assert clean["state"] == first["state"] == "closed", (clean, first)
        # Each round's result evaluated before the next round can supersede it.
        clean["evaluations"] = evaluations(fed, CLEAN, clean["result_version"])
        first["evaluations"] = evaluations(fed, STUDY, first["result_version"])
        base = weights(fed, first["base_version"])
        result = weights(fed, first["result_version"])

        second = fed.open_round(study=STUDY)
        second = fed.wait_for_round(second["round"], "closed", "failed", study=STUDY, timeout_s=120)
        events = hub_audit(fed.hub.home, root / "hub-audit.jsonl")
        yield Attack(fed, first, clean, second, base, result, events)


def test_the_attacking_daemon_audits_its_attack(attack: Attack) -> None:
    enabled = [
        e for e in node_audit_events(attack.fed.nodes[ATTACKER]) if e["action"] == "attack.enabled"
    ]
    assert [(e["details"]["attack"], e["details"]["factor"]) for e in enabled] == [
        ("scale", FACTOR)
    ]
    for site in HOSPITALS:
        assert not [e for e in node_audit_events(attack.fed.nodes[site])
                    if e["action"] == "attack.enabled"]  # fmt: skip


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
    model = attack.fed.get(f"/v1/models/{attack.first['result_version']}")
    honest = max(c["update_norm"] for c in model["contributors"])
    (sent,) = model["excluded"]
    # FedAvg with the attacker folded in would have moved the model by about its weight share
    # of its update's norm, well past any honest update: the attack matters here.
    share = sent["n"] / (sent["n"] + sum(c["n"] for c in model["contributors"]))
    assert share * sent["update_norm"] > 2 * honest, (share, sent, honest)
    moved = float(
        np.sqrt(sum(np.square(attack.result[k] - attack.base[k]).sum() for k in attack.base))
    )
    assert moved <= honest * (1 + 1e-5)  # the median of the two honest updates only


def test_the_model_keeps_the_accuracy_of_the_round_without_the_attacker(attack: Attack) -> None:
    assert attack.clean["state"] == "closed", attack.clean
    assert sorted(attack.clean["selected"]) == sorted(HOSPITALS)
    clean_base = weights(attack.fed, attack.clean["base_version"])  # the same version-0 weights
    assert all(np.array_equal(clean_base[k], attack.base[k]) for k in attack.base)

    def pooled(rows: dict[str, dict[str, Any]]) -> float:
        right = sum(float(r["accuracy"]) * int(r["n"]) for r in rows.values())
        return right / sum(int(r["n"]) for r in rows.values())

    clean_result = weights(attack.fed, attack.clean["result_version"])
    for key in attack.result:  # the very model of the round without the attacker
        np.testing.assert_allclose(attack.result[key], clean_result[key], atol=1e-5)
    attacked, clean = pooled(attack.first["evaluations"]), pooled(attack.clean["evaluations"])
    assert attacked == pytest.approx(clean, abs=0.02), (
        attack.first["evaluations"],
        attack.clean["evaluations"],
    )


def test_the_attacker_is_flagged_and_audited_with_its_numbers(attack: Attack) -> None:
    flagged = [e for e in attack.events if e["action"] == "update.flagged"]
    assert [e["details"]["node"] for e in flagged] == [ATTACKER]
    details = flagged[0]["details"]
    assert details["round"] == attack.first["round"] and details["excluded"] is True
    assert max(details["z_norm"], details["z_distance"]) > DETECTION["threshold"]
    model = attack.fed.get(f"/v1/models/{attack.first['result_version']}")
    assert details["norm"] == pytest.approx(model["excluded"][0]["update_norm"], rel=1e-4)
    # Ten times the honest update of the same rows: VA's (full-batch SGD is deterministic).
    (va,) = [c for c in model["contributors"] if c["node"] == "va"]
    assert details["norm"] == pytest.approx(FACTOR * va["update_norm"], rel=1e-4)


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
    readmitted = [e for e in hub_audit(home, out) if e["action"] == "node.readmitted"]
    assert [json.dumps(e["details"], sort_keys=True) for e in readmitted] == [
        json.dumps({"previous": 0.5, "reputation": 1.0}, sort_keys=True)
    ]
