"""A SecAgg+ round survives the hub being SIGKILLed in each of its stages (issue 9, item 5).

A hub and four node daemons, real processes on 127.0.0.1. In one round the hub is killed
three times: in sharing, in masking and in unmasking, each time for longer than the ~7.5 s the
nodes used to retry before they dropped their round keys, and restarted on the same home and
port. Every node must stay in the round, and the model must be plaintext FedAvg of the four
contributions the nodes recorded.

To kill *in* a stage without racing it, one node per stage is held still (SIGSTOP, as a slow
node) before it can answer that stage, so the stage cannot close; the test waits on the hub's
store until the other three have answered, kills the hub, and lets the held node go while the
hub is down, so its answer meets a dead hub first:

    advertising  held by D (stopped before the round opens), let go once A, B, C advertised;
    sharing      held by A (stopped after its advert)         → kill 1, A let go
    masking      held by B (stopped after its shares)         → kill 2, B let go
    unmasking    held by C (stopped after its masked input)   → kill 3, C let go
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from aipipe.secure.encoding import fixed_point_codec
from tests.e2e_support import (
    Federation,
    node_audit_events,
    secagg_senders,
    secagg_stage,
    wait_until,
)
from tests.secure_e2e_support import fedavg, model, sent

pytestmark = pytest.mark.e2e

SITES = ("cleveland", "hungarian", "switzerland", "va")
A, B, C, D = SITES
STUDY = "e2e-secagg-restart"
STAGE_S = 120.0  # no stage may time out here: every node must stay in the round
ROUND_S = 400.0
OUTAGE_S = 8.0  # + the restart: longer than the ~7.5 s of retries after which nodes gave up
UPDATE_CLIP = 10.0


@dataclass
class Story:
    fed: Federation
    info: dict[str, Any]
    killed_in: list[str | None]
    outages: list[float]


def answered(fed: Federation, kind: str, nodes: set[str]) -> None:
    """Wait until the hub's round log holds `kind` from each of `nodes`."""
    wait_until(
        lambda: nodes <= secagg_senders(fed.hub.home, STUDY, 1, kind),
        what=f"{kind} from {sorted(nodes)}",
        timeout_s=ROUND_S,
        context=fed.group.logs,
    )


def kill_hub(fed: Federation, let_go: str, hold: str | None) -> tuple[str | None, float]:
    """SIGKILL the hub; let the node holding the stage go (it meets a dead hub) and hold the
    next one; restart the hub after OUTAGE_S. (stage it died in, seconds it was away)."""
    fed.kill_hub()
    died = time.monotonic()
    stage = secagg_stage(fed.hub.home, STUDY, 1)
    fed.daemons[let_go].resume()
    if hold is not None:
        fed.daemons[hold].pause()
    time.sleep(OUTAGE_S)  # the outage itself, not a wait for a stage
    fed.restart_hub()
    return stage, time.monotonic() - died


@pytest.fixture(scope="module")
def story(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Story]:
    root = tmp_path_factory.mktemp("secagg-restart")
    secure = {
        "secure": "secagg",
        "min_nodes": 3,
        "secure_options": {"stage_timeout_s": STAGE_S, "update_clip": UPDATE_CLIP},
    }
    with Federation.running(  # the federation's own study is the one the round is of
        root, sites=SITES, deadline_s=ROUND_S, study=STUDY, study_fields=secure
    ) as fed:
        fed.start_daemons(*SITES, poll_s=1.0)
        try:
            fed.daemons[D].pause()
            fed.open_round(study=STUDY)
            answered(fed, "advert", {A, B, C})
            for site in (A, B, C):
                fed.daemons[site].pause()
            fed.daemons[D].resume()
            answered(fed, "shares", {D})
            fed.daemons[B].resume()
            fed.daemons[C].resume()
            answered(fed, "shares", {B, C, D})
            stages, outages = [], []
            for let_go, hold, kind, others in (
                (A, B, "masked", {A, C, D}),  # kill 1 (sharing): then A, C, D mask
                (B, C, "unmask", {A, B, D}),  # kill 2 (masking): then A, B, D unmask
                (C, None, "", set()),  # kill 3 (unmasking): then C unmasks, the round closes
            ):
                stage, outage = kill_hub(fed, let_go, hold)
                stages.append(stage)
                outages.append(outage)
                if kind:
                    answered(fed, kind, others)
            info = fed.wait_for_round(1, "closed", "failed", study=STUDY, timeout_s=ROUND_S)
        finally:
            for process in fed.daemons.values():
                if process.running():
                    process.resume()
        yield Story(fed, info, stages, outages)


def test_the_hub_was_killed_once_in_each_stage_for_longer_than_the_old_retries(
    story: Story,
) -> None:
    assert story.killed_in == ["sharing", "masking", "unmasking"]
    assert min(story.outages) > OUTAGE_S > 7.5


def test_the_round_closes_with_every_node(story: Story) -> None:
    assert story.info["state"] == "closed", story.info["reason"]
    assert story.info["reported"] == sorted(SITES)


def test_the_model_equals_plaintext_fedavg_of_the_four_contributions(story: Story) -> None:
    info, fed = story.info, story.fed
    expected = fedavg(fed, info, info["reported"])
    got = model(fed, info["result_version"])
    codec = fixed_point_codec(UPDATE_CLIP, len(SITES), 32)
    weight = float(np.sum([sent(fed, s, STUDY)[0] for s in info["reported"]]))
    bound = 1.01 * codec.error_bound(len(SITES)) * (1 + UPDATE_CLIP) / weight + 1e-6
    for key in expected:
        assert np.max(np.abs(got[key] - expected[key])) <= bound, key


def test_each_node_trained_and_paid_once_and_kept_no_round_state(story: Story) -> None:
    for site, home in story.fed.nodes.items():
        trains = [
            e
            for e in node_audit_events(home)
            if e["action"] == "train" and e["resource"] == f"study/{STUDY}"
        ]
        assert len(trains) == 1 and trains[0]["outcome"] == "success", (site, trains)
        assert not list((home / "secure" / "rounds").rglob("*.state")), site
