"""A hub and three hospital nodes as real processes on 127.0.0.1: rounds, crashes, attacks, audit.

Everything runs through the `aipipe` CLI as a user would (see `tests/e2e_support.py`): the hub
is `aipipe hub serve --port 0`, each node is `aipipe node start` over its own hospital's FHIR
data, and training is `aipipe train run`.

`hub serve` and every `node start` import torch, seconds each on two cores, so one federation
serves the whole module. The `story` fixture runs the scenarios in order, each on a study of
its own, and records what happened:

1. three rounds of `train run` with three node daemons;
2. a round of a second study in which the hub is SIGKILLed after it accepted hungarian's update
   while switzerland and va were mid-work, then restarted on the same port, after which those
   two finish against the new hub;
3. a round of a third study in which va is SIGKILLed after it took the work;
4. SIGTERM to the two daemons left, once they are idle.

Each test asserts one behaviour on that record or on the hub it leaves behind; the refused-update
tests publish studies of their own on the same hub. Only processes the fixture started are
stopped, when the module ends.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import pytest

from aipipe.study.spec import load_study
from aipipe.wire import UpdateHeader
from aipipe.wire.tensors import decode_arrays
from tests.e2e_support import (
    FRAME_HEADERS,
    SITES,
    Federation,
    NodeKeys,
    aipipe,
    aipipe_in_process,
    audit_events,
    frame,
    node_audit_events,
    signed_update,
    wait_until,
)

pytestmark = pytest.mark.e2e

KILLED_NODE_DEADLINE_S = 15.0
SIGTERM_EXIT_S = 10.0
QUORUM_STUDY = "e2e-heart-quorum"
RESTART_STUDY = "e2e-heart-restart"


# -- reading what the processes left behind ---------------------------------------------------


def hub_row(hub_home: Path, sql: str, *params: Any) -> sqlite3.Row:
    """One row of the hub's own store, opened read-only (for what the API does not show)."""
    conn = sqlite3.connect(f"file:{hub_home / 'hub.sqlite'}?mode=ro", uri=True, timeout=10)
    conn.row_factory = sqlite3.Row
    try:
        row: sqlite3.Row | None = conn.execute(sql, params).fetchone()
    finally:
        conn.close()
    assert row is not None, f"no row for {sql} {params}"
    return row


def examples_sent(node_home: Path, study: str, round_number: int) -> int:
    """How many examples a node says, in its own audit log, it trained on in a round."""
    sent = [
        e["details"]["n"]
        for e in node_audit_events(node_home)
        if e["action"] == "train"
        and e["resource"] == f"study/{study}"
        and e["details"].get("round") == round_number
        and "n" in e["details"]
    ]
    assert len(sent) == 1, f"{node_home.name} trained {len(sent)} times in round {round_number}"
    return int(sent[0])


def took_work(node_home: Path, study: str) -> bool:
    """Whether a node has started on a study: it extracts features first (and audits it)."""
    return any(
        e["action"] == "features.extract" and e["resource"] == f"study/{study}"
        for e in node_audit_events(node_home)
    )


@contextlib.contextmanager
def write_locked(database: Path) -> Iterator[None]:
    """Hold SQLite's write lock on `database`: its owner can read but not write until released."""
    conn = sqlite3.connect(database, isolation_level=None, timeout=10)
    try:
        conn.execute("BEGIN IMMEDIATE")
        yield
        conn.execute("ROLLBACK")
    finally:
        conn.close()


# -- the scenarios ----------------------------------------------------------------------------


@dataclass
class KilledNode:
    victim: str
    round: dict[str, Any]
    model: dict[str, Any]
    closed_at: str


@dataclass
class Sigtermed:
    site: str
    exit_code: int | None
    seconds: float
    log: str


@dataclass
class HubCrash:
    first: str
    reported_before_kill: list[str]
    round: dict[str, Any]
    lineage: dict[str, Any]
    sent: dict[str, int]


@dataclass
class Story:
    fed: Federation
    run: subprocess.CompletedProcess[str]
    killed: KilledNode
    sigtermed: dict[str, Sigtermed]
    crash: HubCrash

    @property
    def sites(self) -> list[str]:
        return sorted(self.fed.nodes)

    def rounds(self) -> list[dict[str, Any]]:
        rounds: list[dict[str, Any]] = self.fed.get(f"/v1/studies/{self.fed.study}/rounds")
        return rounds


def train_three_rounds(fed: Federation) -> subprocess.CompletedProcess[str]:
    return aipipe(
        "train", "run", "--study", fed.study, "--rounds", "3", "--json",
        env=fed.admin_env, check=False, timeout_s=240,
    )  # fmt: skip


def kill_a_node_mid_round(fed: Federation, victim: str) -> KilledNode:
    """Open a round of a new study and SIGKILL `victim` once it has taken the round's work."""
    fed.publish(QUORUM_STUDY, deadline_s=60)
    # The victim can read its store but not write to it, so it takes the work, extracts its
    # features (audited) and then waits to charge its privacy ledger: mid-round for certain.
    with write_locked(fed.nodes[victim] / "store.sqlite"):
        opened = fed.open_round(deadline_s=KILLED_NODE_DEADLINE_S, study=QUORUM_STUDY)
        wait_until(
            lambda: took_work(fed.nodes[victim], QUORUM_STUDY),
            what=f"{victim} to start on round {opened['round']} of {QUORUM_STUDY}",
            context=fed.group.logs,
        )
        fed.daemons[victim].kill()
    info = fed.wait_for_round(opened["round"], "closed", "failed", study=QUORUM_STUDY)
    model = fed.get(f"/v1/models/{info['result_version']}") if info["result_version"] else {}
    closed_at = hub_row(
        fed.hub.home,
        "SELECT closed_at FROM rounds WHERE study = ? AND round = ?",
        QUORUM_STUDY,
        opened["round"],
    )["closed_at"]
    return KilledNode(victim, info, model, closed_at)


def wait_evaluated(fed: Federation, sites: list[str], version: str | None) -> None:
    """Wait until every one of `sites` has evaluated model `version` (if there is one): their
    daemons then have nothing of it left to do."""
    if version:
        wait_until(
            lambda: set(sites) <= set(fed.get(f"/v1/models/{version}")["metrics"]),
            what=f"{', '.join(sites)} to evaluate model {version[:12]}",
            context=fed.group.logs,
        )


def sigterm_when_idle(
    fed: Federation, sites: list[str], last_model: str | None
) -> dict[str, Sigtermed]:
    """SIGTERM `sites` together once they have nothing left to do (they evaluated the latest
    model); how each exited and how long after the signal."""
    wait_evaluated(fed, sites, last_model)
    signalled = time.monotonic()
    for site in sites:
        fed.daemons[site].send(signal.SIGTERM)
    stopped = {}
    for site in sites:
        daemon = fed.daemons[site]
        left = SIGTERM_EXIT_S - (time.monotonic() - signalled)
        try:
            code: int | None = daemon.popen.wait(timeout=max(left, 0.1))
        except subprocess.TimeoutExpired:
            code = None
        stopped[site] = Sigtermed(site, code, time.monotonic() - signalled, daemon.log_tail())
    return stopped


def crash_the_hub_mid_round(fed: Federation, *, first: str, mid_work: list[str]) -> HubCrash:
    """`first` reports; the hub is SIGKILLed while the `mid_work` nodes train, and restarted
    on its port; then they finish. Their stores are write-locked until the hub is back, so they
    take the work but cannot report before the kill."""
    fed.publish(RESTART_STUDY, deadline_s=120)
    with contextlib.ExitStack() as locks:
        for site in mid_work:
            locks.enter_context(write_locked(fed.nodes[site] / "store.sqlite"))
        number = fed.open_round(study=RESTART_STUDY)["round"]
        wait_until(
            lambda: (
                first in fed.round(number, RESTART_STUDY)["reported"]
                and all(took_work(fed.nodes[site], RESTART_STUDY) for site in mid_work)
            ),
            what=f"{first} to report and {', '.join(mid_work)} to start on round {number}",
            context=fed.group.logs,
        )
        reported = fed.round(number, RESTART_STUDY)["reported"]
        fed.kill_hub()
        fed.restart_hub()
    info = fed.wait_for_round(number, "closed", "failed", study=RESTART_STUDY)
    version = info["result_version"]
    row = hub_row(fed.hub.home, "SELECT lineage FROM models WHERE version = ?", version or "")
    sent = {site: examples_sent(home, RESTART_STUDY, number) for site, home in fed.nodes.items()}
    return HubCrash(first, reported, info, json.loads(row["lineage"]), sent)


@pytest.fixture(scope="module")
def story(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Story]:
    with Federation.running(tmp_path_factory.mktemp("federation"), sites=SITES) as fed:
        fed.start_daemons(*fed.nodes)
        run = train_three_rounds(fed)
        crash = crash_the_hub_mid_round(fed, first="hungarian", mid_work=["switzerland", "va"])
        # The quorum round's deadline is short: its survivors must not spend it still evaluating
        # the crash round's model (under load that took them past it).
        wait_evaluated(fed, crash.round["reported"], crash.round["result_version"])
        killed = kill_a_node_mid_round(fed, victim="va")
        idle = ["hungarian", "switzerland"]
        sigtermed = sigterm_when_idle(fed, idle, killed.round["result_version"])
        yield Story(fed, run, killed, sigtermed, crash)


# -- 1. three rounds --------------------------------------------------------------------------


class TestThreeRoundsOfTraining:
    def test_train_run_exits_zero(self, story: Story) -> None:
        assert story.run.returncode == 0, story.run.stderr + story.fed.group.logs()

    def test_every_round_closes_with_all_three_nodes_contributing(self, story: Story) -> None:
        rounds = story.rounds()

        models = [story.fed.get(f"/v1/models/{r['result_version']}") for r in rounds]

        assert [r["state"] for r in rounds] == ["closed"] * 3
        contributors = [sorted(c["node"] for c in m["contributors"]) for m in models]
        assert contributors == [story.sites] * 3

    def test_each_round_makes_a_model_version_whose_parent_is_the_previous_one(
        self, story: Story
    ) -> None:
        models = story.fed.get("/v1/models", study=story.fed.study)
        rounds = story.rounds()

        assert [m["round"] for m in models] == [0, 1, 2, 3]
        assert [m["parent"] for m in models] == [None] + [m["version"] for m in models[:-1]]
        assert [r["result_version"] for r in rounds] == [m["version"] for m in models[1:]]
        assert [r["base_version"] for r in rounds] == [m["version"] for m in models[:-1]]

    def test_every_node_evaluates_every_round_model_and_sends_no_number(self, story: Story) -> None:
        rounds = story.rounds()

        reported = [sorted(r["metrics"]) for r in rounds]
        numbers = [v for r in rounds for m in r["metrics"].values() for v in m.values()]

        assert reported == [story.sites] * 3
        assert numbers and all(v is None for v in numbers)  # n_test, accuracy… stay home

    @pytest.mark.parametrize("site", SITES)
    def test_privacy_status_shows_epsilon_spent_within_the_budget(
        self, story: Story, site: str
    ) -> None:
        home = story.fed.nodes[site]

        result = aipipe_in_process("privacy", "status", "--home", home, "--json")

        report = json.loads(result.stdout)
        (status,) = [s for s in report["studies"] if s["study"] == story.fed.study]
        assert status["rounds"] == 3
        assert 0 < status["spent"] <= status["epsilon_budget"]
        assert 0 < report["site"]["spent"] <= report["site"]["epsilon_budget"]

    def test_train_run_json_prints_nothing_but_json(self, story: Story) -> None:
        rounds = json.loads(story.run.stdout)

        assert [r["round"] for r in rounds] == [1, 2, 3]


# -- 2. the hub crashes mid-round ---------------------------------------------------------------


class TestHubCrash:
    def test_a_round_closes_after_the_hub_is_killed_and_restarted_on_its_port(
        self, story: Story
    ) -> None:
        crash = story.crash

        reported = sorted(crash.round["reported"])

        assert crash.reported_before_kill == [crash.first]
        assert crash.round["state"] == "closed", crash.round
        assert reported == story.sites

    def test_the_lineage_counts_the_update_accepted_before_the_hub_was_killed(
        self, story: Story
    ) -> None:
        crash = story.crash

        contributed = {c["node"]: c["n"] for c in crash.lineage["contributors"]}

        assert contributed == crash.sent
        assert crash.lineage["total_examples"] == sum(crash.sent.values())


# -- 3. and 4. nodes that die or are stopped --------------------------------------------------


class TestNodeFailures:
    def test_a_round_closes_at_its_deadline_with_the_nodes_left_after_one_is_killed(
        self, story: Story
    ) -> None:
        killed = story.killed

        survivors = [s for s in story.sites if s != killed.victim]

        assert killed.round["state"] == "closed", killed.round
        assert sorted(killed.round["reported"]) == survivors
        assert killed.round["declined"] == {}
        assert killed.closed_at >= killed.round["deadline"]

    def test_the_lineage_of_a_quorum_round_lists_only_its_contributors(self, story: Story) -> None:
        killed = story.killed

        contributors = sorted(c["node"] for c in killed.model["contributors"])

        assert contributors == [s for s in story.sites if s != killed.victim]

    @pytest.mark.parametrize("site", ["hungarian", "switzerland"])
    def test_an_idle_node_stops_on_sigterm_with_exit_code_zero(
        self, story: Story, site: str
    ) -> None:
        stopped = story.sigtermed[site]

        assert stopped.exit_code == 0, stopped.log
        assert stopped.seconds < SIGTERM_EXIT_S
        assert "stopped after" in stopped.log


# -- refused updates --------------------------------------------------------------------------


@dataclass
class OpenRound:
    study: str
    digest: str
    number: int
    base_version: str
    base: dict[str, npt.NDArray[Any]]


@dataclass
class Attacker:
    """Crafts updates with the nodes' real keys and credentials, straight to the hub's API."""

    fed: Federation
    keys: dict[str, NodeKeys]

    def open(self, study: str) -> OpenRound:
        """Publish a copy of the test study under `study` and open its first round."""
        spec = load_study(self.fed.study_file).model_dump(mode="json")
        info = self.fed.post("/v1/studies", {"spec": {**spec, "name": study}})
        return self.next_round(study, info["digest"])

    def next_round(self, study: str, digest: str) -> OpenRound:
        opened = self.fed.open_round(deadline_s=300, study=study)
        version = opened["base_version"]
        with self.fed.admin() as client:
            base = decode_arrays(client.get(f"/v1/models/{version}/weights").content)
        return OpenRound(study, digest, opened["round"], version, base)

    def update(self, node: str, at: OpenRound, *, n: int = 10) -> tuple[UpdateHeader, bytes]:
        return signed_update(
            self.keys[node].identity,
            node=node,
            study=at.study,
            study_digest=at.digest,
            round=at.number,
            base_version=at.base_version,
            delta={k: np.full_like(v, 0.01) for k, v in at.base.items()},
            num_examples=n,
        )

    def post(self, node: str, at: OpenRound, body: bytes) -> httpx.Response:
        return httpx.post(
            f"{self.fed.hub.url}/v1/studies/{at.study}/rounds/{at.number}/updates",
            content=body,
            headers={**self.keys[node].headers, **FRAME_HEADERS},
            timeout=30,
            verify=self.fed.hub.verify,
        )

    def refusal_reasons(self, at: OpenRound, out: Path) -> list[str]:
        """Reasons of the `update.refused` events the hub audited for this round."""
        return [
            e["details"].get("reason")
            for e in audit_events(self.fed.hub.home, out)
            if e["action"] == "update.refused"
            and e["resource"] == f"study/{at.study}/round/{at.number}"
        ]


@pytest.fixture
def attacker(story: Story) -> Attacker:
    return Attacker(
        story.fed, {site: NodeKeys.load(home) for site, home in story.fed.nodes.items()}
    )


class TestRefusedUpdates:
    def test_a_payload_changed_after_signing_is_refused_and_audited(
        self, attacker: Attacker, tmp_path: Path
    ) -> None:
        at = attacker.open("tampered-payload")
        header, payload = attacker.update("hungarian", at)
        forged = payload[:-1] + bytes([payload[-1] ^ 0x40])  # one bit of the last float

        response = attacker.post("hungarian", at, frame(header, forged))

        assert response.status_code == 409
        assert "tampered" in response.json()["detail"]
        audited = attacker.refusal_reasons(at, tmp_path / "audit.jsonl")
        assert audited == [response.json()["detail"]]

    def test_num_examples_changed_after_signing_is_refused_and_audited(
        self, attacker: Attacker, tmp_path: Path
    ) -> None:
        at = attacker.open("tampered-header")
        header, payload = attacker.update("hungarian", at, n=10)
        inflated = header.model_copy(update={"num_examples": 10_000})  # the old signature stays

        response = attacker.post("hungarian", at, frame(inflated, payload))

        assert response.status_code == 409
        assert "signature does not verify" in response.json()["detail"]
        audited = attacker.refusal_reasons(at, tmp_path / "audit.jsonl")
        assert audited == [response.json()["detail"]]

    def test_the_same_signed_update_posted_twice_is_refused_the_second_time(
        self, attacker: Attacker, tmp_path: Path
    ) -> None:
        at = attacker.open("replayed-twice")
        body = frame(*attacker.update("hungarian", at))
        first = attacker.post("hungarian", at, body)

        again = attacker.post("hungarian", at, body)

        assert first.status_code == 200, first.text
        assert again.status_code == 409
        assert "duplicate" in again.json()["detail"]
        audited = attacker.refusal_reasons(at, tmp_path / "audit.jsonl")
        assert audited == [again.json()["detail"]]

    def test_an_update_replayed_into_a_later_round_is_refused_and_audited(
        self, attacker: Attacker, tmp_path: Path
    ) -> None:
        first = attacker.open("replayed-later")
        bodies = {site: frame(*attacker.update(site, first)) for site in SITES}
        accepted = [attacker.post(site, first, body).status_code for site, body in bodies.items()]
        assert accepted == [200] * len(SITES)
        later = attacker.next_round(first.study, first.digest)

        response = attacker.post("hungarian", later, bodies["hungarian"])

        assert response.status_code == 409
        assert f"round {first.number}, not" in response.json()["detail"]
        audited = attacker.refusal_reasons(later, tmp_path / "audit.jsonl")
        assert audited == [response.json()["detail"]]


# -- the audit trail --------------------------------------------------------------------------


class TestAuditTrail:
    def test_audit_verify_passes_on_the_hubs_log_after_the_run(self, story: Story) -> None:
        result = aipipe("audit", "verify", "--home", story.fed.hub.home, "--json", check=False)

        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["valid"] is True and report["events"] > 0

    def test_audit_verify_names_the_event_an_attacker_edited(
        self, story: Story, tmp_path: Path
    ) -> None:
        hub = tmp_path / "hub"  # a consistent copy, so the running hub keeps its own log intact
        hub.mkdir()
        source = sqlite3.connect(story.fed.hub.home / "audit.sqlite")
        target = sqlite3.connect(hub / "audit.sqlite")
        source.backup(target)
        source.close()
        target.close()
        shutil.copy2(story.fed.hub.home / "identity.key", hub / "identity.key")
        conn = sqlite3.connect(hub / "audit.sqlite", isolation_level=None)
        seq, details = conn.execute(
            "SELECT seq, details FROM events WHERE action = 'update.accepted' ORDER BY seq LIMIT 1"
        ).fetchone()
        forged = {**json.loads(details), "n": json.loads(details)["n"] + 1000}
        conn.execute("DROP TRIGGER events_no_update")  # as an attacker with file access would
        conn.execute(
            "UPDATE events SET details = ? WHERE seq = ?",
            (json.dumps(forged, sort_keys=True, separators=(",", ":")), seq),
        )
        conn.close()

        result = aipipe("audit", "verify", "--home", hub, check=False)

        assert result.returncode != 0
        assert re.search(rf"\bevent {seq}\b", result.stderr), result.stderr
