"""Personal models made when the node is idle, off the round's critical path
(`aipipe.node.personal_pending`, `aipipe.node.daemon`).

Real node homes over the shipped heart-disease FHIR data (Cleveland and Switzerland), a real hub
app in-process, the nodes' own workers and daemons: evaluating a round's result leaves its
personal model pending; the daemon makes it when the hub has no work, after any round that
opened meanwhile, and in `once` mode before it stops.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from aipipe.node.client import HubClient
from aipipe.node.daemon import Daemon
from aipipe.node.home import init_node
from aipipe.node.node import Node
from aipipe.node.personal import PersonalModels
from aipipe.node.personal_pending import PendingPersonal, Skipped
from aipipe.personalization import registry
from aipipe.personalization.finetune import FineTuning
from aipipe.wire import EvaluateWork, RoundWork
from tests.hub_support import Hub, running_hub
from tests.personal_support import FHIR_DIR, NAME, personal_study
from tests.test_personal_model import _enrol

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@dataclass
class Sites:
    hub: Hub
    nodes: dict[str, Node]
    homes: dict[str, Path]
    clients: dict[str, HubClient]
    tokens: dict[str, str]

    def client(self, name: str) -> HubClient:
        """A fresh client of site `name` (closing a node closes its client)."""
        return HubClient("http://testserver", token=self.tokens[name],
                         transport=self.hub.client._transport)  # fmt: skip


@pytest.fixture
def sites(tmp_path: Path) -> Iterator[Sites]:
    with ExitStack() as stack:
        hub = stack.enter_context(running_hub(tmp_path / "hub"))
        hub.publish(personal_study(training={**personal_study()["training"], "rounds": 5}))
        nodes, homes, clients, tokens = {}, {}, {}, {}
        for name, site in (("cleveland", "cleveland"), ("basel", "switzerland")):
            paths = init_node(tmp_path / name, name)
            tokens[name] = _enrol(hub, paths)
            client = HubClient("http://testserver", token=tokens[name],
                               transport=hub.client._transport)  # fmt: skip
            node = stack.enter_context(Node.open(paths.home, hub=client))
            node.ingest_files([FHIR_DIR / site])
            node.approve(NAME)
            nodes[name], homes[name], clients[name] = node, paths.home, client
        yield Sites(hub, nodes, homes, clients, tokens)


def _work(sites: Sites, kind: str, names: tuple[str, ...] = ("cleveland", "basel")) -> None:
    for name in names:
        node = sites.nodes[name]
        item = node.hub.work(wait_s=0)
        assert isinstance(item, EvaluateWork | RoundWork) and item.kind == kind, item
        node.worker(lambda line: None).handle(item)


def _round(sites: Sites) -> str:
    """Open a round, both sites train it; its result's version."""
    assert sites.hub.post_round(NAME).status_code == 200
    _work(sites, "train")
    return str(_current(sites))


def _current(sites: Sites) -> Any:
    info = sites.hub.client.get(f"/v1/studies/{NAME}", headers=sites.hub.admin).json()
    return info["current_version"]


def _daemon(node: Node, lines: list[str] | None = None) -> Daemon:
    log = (lines if lines is not None else []).append
    return Daemon(node.worker(log), log, poll_wait_s=1.0)


def _actions(node: Node) -> list[tuple[str, Mapping[str, Any]]]:
    return [(e.action, e.details) for e in node.audit.events()]


def test_a_round_that_opens_after_an_evaluation_is_trained_before_the_personal_model(
    sites: Sites,
) -> None:
    """The coordinator opens the next round as soon as the site's evaluation is in (as `train
    run` does): the node trains it first and personalizes only when the hub has nothing more."""
    version = _round(sites)
    node, report = sites.nodes["cleveland"], sites.clients["cleveland"].report

    def report_then_open(*args: Any, **kwargs: Any) -> Any:
        out = report(*args, **kwargs)
        assert sites.hub.post_round(NAME).status_code == 200
        return out

    sites.clients["cleveland"].report = report_then_open  # type: ignore[method-assign]
    assert _daemon(node).run(once=True) == 2  # evaluate round 1, train round 2

    actions = [a for a, _ in _actions(node)]
    evaluated = actions.index("evaluate")
    personal = actions.index("personal.model")
    trained = [i for i, (a, d) in enumerate(_actions(node)) if a == "train" and d.get("round") == 2]
    assert trained and evaluated < trained[0] < personal, actions[evaluated:]
    assert PersonalModels(node.store.db).get(NAME, version) is not None  # `once` made it


def test_a_pending_personal_model_survives_a_restart_and_is_made_at_the_next_idle(
    sites: Sites,
) -> None:
    version = _round(sites)
    _work(sites, "evaluate", ("basel",))
    node = sites.nodes["basel"]
    assert PersonalModels(node.store.db).get(NAME, version) is None  # not made in the work item
    assert [p.version for p in PendingPersonal(node.store).all()] == [version]
    node.close()

    with Node.open(sites.homes["basel"], hub=sites.client("basel")) as again:
        assert [p.version for p in PendingPersonal(again.store).all()] == [version]
        lines: list[str] = []
        assert _daemon(again, lines).run(once=True) == 0  # nothing from the hub: idle at once
        mine = PersonalModels(again.store.db).get(NAME, version)
        assert mine is not None and PendingPersonal(again.store).all() == []
        assert any(mine.sha256[:12] in line for line in lines), lines
        [made] = [d for a, d in _actions(again) if a == "personal.model"]
        assert made["version"] == version and made["sha256"] == mine.sha256


def test_a_superseded_version_is_not_made(sites: Sites) -> None:
    first = _round(sites)
    _work(sites, "evaluate", ("basel",))
    node = sites.nodes["basel"]
    _work(sites, "evaluate", ("cleveland",))
    second = _round(sites)
    _work(sites, "evaluate", ("basel",))

    assert [p.version for p in PendingPersonal(node.store).all()] == [second]
    _daemon(node).run(once=True)
    kept = PersonalModels(node.store.db)
    assert kept.get(NAME, first) is None and kept.get(NAME, second) is not None
    assert [d["version"] for a, d in _actions(node) if a == "personal.model"] == [second]
    # Audited once, when the node was idle: the versions skipped and the one made instead.
    [skipped] = [d for a, d in _actions(node) if a == "personal.skipped"]
    assert skipped == {"study": NAME, "skipped": [{"round": 1, "version": first}], "count": 1,
                       "superseded_by": second}  # fmt: skip


def test_a_round_of_a_personalized_study_audits_no_more_than_a_plain_one(sites: Sites) -> None:
    """During back-to-back rounds every evaluation supersedes the pending version: recording
    that appends no audit event (each is an fsync'd write, on the round's path), so the node's
    log grows by the events of a plain round only; the skipped versions are audited in one
    event when the node is idle and makes the newest."""
    workers = {name: node.worker(lambda line: None) for name, node in sites.nodes.items()}
    versions = []
    for _ in range(3):
        assert sites.hub.post_round(NAME).status_code == 200
        for kind in ("train", "evaluate"):
            for name, worker in workers.items():
                before = len(_actions(sites.nodes[name]))
                item = worker.client.work(wait_s=0)
                assert item.kind == kind, item
                worker.handle(item)
                if kind == "evaluate" and versions:  # a version is pending: it supersedes it
                    new = [a for a, _ in _actions(sites.nodes[name])[before:]]
                    assert new == ["evaluate"], (name, new)
        versions.append(str(_current(sites)))
    node = sites.nodes["basel"]
    assert [p.version for p in PendingPersonal(node.store).all()] == [versions[-1]]
    _daemon(node).run(once=True)
    made = [(a, d) for a, d in _actions(node) if a.startswith("personal.")]
    assert [a for a, _ in made] == ["personal.model", "personal.skipped"], made
    assert made[1][1]["skipped"] == [{"round": 1, "version": versions[0]},
                                     {"round": 2, "version": versions[1]}]  # fmt: skip
    assert made[1][1]["superseded_by"] == versions[2] == made[0][1]["version"]


class _Stopped(FineTuning):
    """Fine-tuning during which SIGTERM comes (the signal is sent from inside its training)."""

    def personalize(self, *args: Any, **kwargs: Any) -> Any:
        os.kill(os.getpid(), signal.SIGTERM)
        return super().personalize(*args, **kwargs)


def test_sigterm_while_personalizing_stops_and_leaves_it_pending(
    sites: Sites, monkeypatch: pytest.MonkeyPatch
) -> None:
    version = _round(sites)
    _work(sites, "evaluate", ("basel",))
    node = sites.nodes["basel"]
    monkeypatch.setattr(registry, "PERSONALIZERS", {**registry.PERSONALIZERS, "finetune": _Stopped})
    daemon = _daemon(node)
    backstop = threading.Timer(20, os.kill, (os.getpid(), signal.SIGTERM))  # never personalized
    backstop.start()
    try:
        daemon.run(once=False)  # returns: SIGTERM stopped it inside the personalization
    finally:
        backstop.cancel()

    assert daemon.stopping
    assert PersonalModels(node.store.db).get(NAME, version) is None
    assert [p.version for p in PendingPersonal(node.store).all()] == [version]
    assert "personal.model" not in [a for a, _ in _actions(node)]


def test_a_hub_gone_while_the_first_extraction_reports_leaves_it_pending(sites: Sites) -> None:
    """A restarted node extracts its features again and reports their statistics to the hub
    first: with the hub gone the version stays pending, to be made at the next idle."""
    version = _round(sites)
    _work(sites, "evaluate", ("basel",))
    sites.nodes["basel"].close()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    gone = HubClient(f"http://127.0.0.1:{port}", token=sites.tokens["basel"], max_retries=0)
    with Node.open(sites.homes["basel"], hub=gone) as again:
        [line] = again.worker(lambda line: None).make_personal()
        assert "still pending" in line, line
        assert [p.version for p in PendingPersonal(again.store).all()] == [version]
        assert PersonalModels(again.store.db).get(NAME, version) is None


def test_a_pending_row_kept_before_superseded_versions_were_listed_is_read(store: Any) -> None:
    """A node store whose `personal_pending` table predates the `superseded` column."""
    store.db.conn.execute(
        "CREATE TABLE personal_pending (study TEXT PRIMARY KEY, study_digest TEXT, "
        "round INTEGER, version TEXT, weights BLOB, created TEXT)"
    )
    store.db.conn.execute(
        "INSERT INTO personal_pending VALUES ('chd', NULL, 3, ?, ?, 'then')", ("v" * 64, b"w")
    )
    table = PendingPersonal(store)
    [row] = table.all()
    assert (row.round, row.version, row.skipped) == (3, "v" * 64, Skipped())
    assert table.head("chd") == (3, "v" * 64, Skipped())
