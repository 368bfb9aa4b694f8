"""The node's validation gate falls back to the newest earlier version that passes here.

When the study's current version misses its `validation:` minimum on this site's held-out
patients, `node predict` (write-back) and `node serve-cds` serve the newest version of the
current version's lineage that this node verifies (each one as the current one: its round, the
result the hub names for it, the weights' content address, the pinned result) and that meets
the minimum here; they refuse only when none does, naming each version tried. The earlier
versions are those this node evaluated and kept (report and weights): falling back asks the hub
for nothing, so the hub sees the same requests whether the current version passes here or not.

A real hub app in-process, a real node home (`init_node`, enrolled with its own keys) over the
shipped Cleveland FHIR data, rounds trained by the node's own worker; each round's result is
then replaced by known weights (a logistic fit on the site's train split, "good", or its
negation, "bad"), addressed as the hub addresses a round's result.
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from sklearn.linear_model import LogisticRegression

from aipipe.cds import FhirAccess
from aipipe.cli.node_render import render_predictions
from aipipe.hub.models import version_id
from aipipe.node.client import HubClient
from aipipe.node.home import init_node
from aipipe.node.lineage import ModelLineage
from aipipe.node.node import Node
from aipipe.privacy.ledger import BudgetLedger
from aipipe.secure.at_rest import MAGIC, AtRestKey
from aipipe.study.spec import load_study
from aipipe.study.validation import ModelQualityError
from aipipe.wire import EvaluateWork, RoundState, RoundWork
from aipipe.wire.tensors import encode_arrays
from tests.cds_support import FHIR, PID, Fhir, cleveland_records, hook_request, prefetch_for
from tests.hub_support import Hub, running_hub
from tests.test_personal_model import _enrol

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]
STUDY_FILE = ROOT / "examples" / "heart-disease" / "study.yaml"
CLEVELAND = ROOT / "examples" / "heart-disease" / "fhir" / "cleveland"
NAME = "fed-heart-disease"
SERVICE = f"{NAME}-patient-view"
Arrays = dict[str, np.ndarray]


@dataclass
class Recorder(httpx.BaseTransport):
    """The hub as the node's client reaches it: each request's method and path (with its
    query) recorded; any whose path names a version in `refused` answered 404 unseen."""

    inner: httpx.BaseTransport
    seen: list[str] = field(default_factory=list)
    refused: set[str] = field(default_factory=set)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        path = request.url.raw_path.decode()
        self.seen.append(f"{request.method} {path}")
        if any(version in path for version in self.refused):
            return httpx.Response(404, json={"detail": "refused by the test's recorder"})
        return self.inner.handle_request(request)


@dataclass
class Site:
    hub: Hub
    node: Node
    good: Arrays  # meets min_auc 0.7 on Cleveland's test split
    bad: Arrays  # the same model negated: AUC 1 − good's
    wire: Recorder  # every request of the node's hub client


def _study() -> dict[str, Any]:
    spec = load_study(STUDY_FILE).model_dump(mode="json", exclude_none=True)
    spec.update(min_nodes=1, validation={"min_auc": 0.7, "min_patients": 20})
    spec["training"] = {**spec["training"], "rounds": 4, "local_steps": 2}
    return spec


@contextmanager
def _site(root: Path, at_rest_key: AtRestKey | None = None) -> Iterator[Site]:
    with running_hub(root / "hub") as hub:
        hub.publish(_study())
        paths = init_node(root / "cleveland", "cleveland", at_rest_key=at_rest_key)
        wire = Recorder(hub.client._transport)
        client = HubClient("http://testserver", token=_enrol(hub, paths), transport=wire)
        with Node.open(paths.home, hub=client, at_rest_key=at_rest_key) as node:
            node.ingest_files([CLEVELAND])
            node.approve(NAME)
            matrix = node.extract(NAME)
            fit = LogisticRegression(C=10.0).fit(matrix.x_train, matrix.y_train)
            good = {"head.weight": fit.coef_.astype(np.float32),
                    "head.bias": fit.intercept_.astype(np.float32)}  # fmt: skip
            bad = {k: -v for k, v in good.items()}
            yield Site(hub, node, good, bad, wire)


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    with _site(tmp_path) as made:
        yield made


def _work(node: Node, kind: str) -> str:
    item = node.hub.work(wait_s=0)
    assert isinstance(item, EvaluateWork | RoundWork) and item.kind == kind, item
    node.worker(lambda line: None).handle(item)
    return item.version


def _round(site: Site, weights: Arrays, *, evaluate: bool = False) -> str:
    """One real round trained by the node, whose result is then replaced by `weights`,
    addressed as the hub addresses a round's result; evaluated by the node's worker if asked
    (which keeps its exact report in `local_evaluations`)."""
    response = site.hub.post_round(NAME)
    assert response.status_code == 200, response.text
    number, base = response.json()["round"], response.json()["base_version"]
    _work(site.node, "train")
    store = site.hub.paths.open_store()
    try:
        blob = store.put_blob(encode_arrays(weights))
        version = version_id(NAME, number, base, blob)
        store.add_model(version, NAME, number, base, "fedavg", blob, {"round": number})
        store.set_round_state(NAME, number, RoundState.CLOSED, result_version=version)
        store.set_study_head(NAME, version, None)
    finally:
        store.close()
    if evaluate:
        assert _work(site.node, "evaluate") == version
    return version


def _set_head(site: Site, version: str) -> None:
    store = site.hub.paths.open_store()
    try:
        store.set_study_head(NAME, version, None)
    finally:
        store.close()


def _events(node: Node, action: str) -> list[Any]:
    return [e for e in node.audit.events() if e.action == action]


def _spent(node: Node) -> float:
    return BudgetLedger(node.store.db).spent(NAME)


# -- (1) the newest fails here, an earlier one passes ----------------------------------------


def test_predict_serves_the_newest_earlier_version_that_passes_and_says_so(
    site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    good = _round(site, site.good, evaluate=True)
    bad = _round(site, site.bad)  # the current version: never evaluated here yet
    node, spent = site.node, _spent(site.node)
    kept = ModelLineage(node.store.db).evaluation(NAME, good)
    assert kept is not None and kept.validation is not None and kept.validation["passed"]

    scores = node.predict(NAME)

    assert scores.version == good and scores.current == bad and scores.older_than_current
    assert scores.scored
    [passed_over] = scores.passed_over
    assert passed_over.version == bad and passed_over.round == 2
    assert "min_auc 0.700" in passed_over.failures[0]
    # the earlier version's kept report is reused, not recomputed; the new one is kept
    assert ModelLineage(node.store.db).evaluation(NAME, good) == kept
    assert ModelLineage(node.store.db).evaluation(NAME, bad) is not None
    assert _spent(node) == spent  # nothing charged: nothing left the node

    [gate] = _events(node, "validation")
    assert gate.outcome == "success" and gate.resource == f"model/{good}"
    assert gate.details["served"] == good and gate.details["current"] == bad
    [over] = gate.details["passed_over"]
    assert over["version"] == bad and over["round"] == 2 and "min_auc" in over["failures"][0]
    [predicted] = _events(node, "predict")
    assert predicted.details["model"] == good and predicted.details["current"] == bad

    render_predictions(scores, as_json=True)
    shown = json.loads(capsys.readouterr().out)
    assert shown["model_version"] == good and shown["current_version"] == bad
    assert shown["older_than_current"] is True
    assert shown["passed_over"][0]["version"] == bad
    render_predictions(scores, as_json=False)
    human = capsys.readouterr().out
    assert good[:12] in human and "older than the current" in human and bad[:12] in human


def test_a_current_version_that_passes_is_served_as_before(site: Site) -> None:
    _round(site, site.bad, evaluate=True)
    good = _round(site, site.good)
    scores = site.node.predict(NAME)
    assert scores.version == good == scores.current and not scores.older_than_current
    assert scores.passed_over == []
    assert "current" not in _events(site.node, "predict")[0].details


# -- (2) none passes ------------------------------------------------------------------------


def test_none_passes_refuses_naming_each_version_tried(site: Site) -> None:
    first = _round(site, site.bad, evaluate=True)
    second = _round(site, site.bad)

    with pytest.raises(ModelQualityError, match="validation minimum") as raised:
        site.node.predict(NAME, write_back_to="https://ehr.example.org/fhir")
    message = str(raised.value)
    assert first[:12] in message and second[:12] in message
    assert message.count("min_auc 0.700") == 2 and "short by" in message

    [gate] = _events(site.node, "validation")
    assert gate.outcome == "refused" and gate.resource == f"model/{second}"
    assert gate.details["use"] == "writeback" and gate.details["served"] is None
    assert [t["version"] for t in gate.details["tried"]] == [second, first]
    assert _events(site.node, "writeback") == []


# -- (3) only the verified lineage ------------------------------------------------------------


def test_a_version_outside_the_verified_lineage_is_never_served(site: Site) -> None:
    good = _round(site, site.good, evaluate=True)
    bad = _round(site, site.bad)
    # the hub lists a version claiming a round this node took no part in, good weights,
    # child of the good version, and makes it current: it cannot be placed in any lineage
    store = site.hub.paths.open_store()
    try:
        blob = store.put_blob(encode_arrays(site.good))
        crafted = version_id(NAME, 7, good, blob)
        store.add_model(crafted, NAME, 7, good, "fedavg", blob, {"round": 7})
    finally:
        store.close()
    _set_head(site, crafted)
    with pytest.raises(ModelQualityError, match="cannot validate it"):
        site.node.predict(NAME)

    # back to the real head, but the hub now serves other weights under the good version:
    # the node falls back to the weights it kept when it evaluated it and never asks for these
    _set_head(site, bad)
    store = site.hub.paths.open_store()
    try:
        other = store.put_blob(encode_arrays({k: v * 1.01 for k, v in site.good.items()}))
        store.conn.execute("UPDATE models SET blob = ? WHERE version = ?", (other, good))
        store.conn.commit()
    finally:
        store.close()
    site.wire.seen.clear()
    scores = site.node.predict(NAME)
    assert scores.version == good and scores.current == bad
    assert [e.outcome for e in _events(site.node, "validation")] == ["refused", "success"]
    assert site.wire.seen and not any(good in seen for seen in site.wire.seen)


# -- (4) the node's CDS service ---------------------------------------------------------------


def test_the_node_cds_service_serves_the_earlier_version_too(site: Site) -> None:
    good = _round(site, site.good, evaluate=True)  # a fallback is one this node evaluated
    bad = _round(site, site.bad)
    node, records = site.node, cleveland_records()
    access = FhirAccess(transport=httpx.MockTransport(Fhir(records)), timeout_s=2.0,
                        allowed_servers=(FHIR,))  # fmt: skip
    app = node.cds_app([NAME], jwt=None, fhir=access, allow_unauthenticated=True,
                       link_lifetime_s=3600.0)  # fmt: skip
    with TestClient(app) as client:
        response = client.post(f"/cds-services/{SERVICE}",
                               json=hook_request(prefetch=prefetch_for(records, PID)))  # fmt: skip
        assert response.status_code == 200, response.text
        [card] = response.json()["cards"]
        shown = client.get(card["source"]["url"].split("testserver", 1)[-1]).json()

    assert good[:12] in card["source"]["label"] and bad[:12] not in card["source"]["label"]
    assert shown["model_version"] == good
    assert shown["lineage"][0]["version"] == good and shown["validation"]["passed"] is True
    [gate] = _events(node, "validation")
    assert gate.details["use"] == "cds" and gate.details["served"] == good
    assert [o["version"] for o in gate.details["passed_over"]] == [bad]


# -- (5) falling back tells the hub nothing ----------------------------------------------------


def _gate_requests(site: Site, current: str, number: int) -> list[str]:
    """The requests of one `node predict` (the gate and what follows), the current version
    and its round number written as placeholders."""
    site.wire.seen.clear()
    site.node.predict(NAME)
    shown = [s.replace(current, "<current>") for s in site.wire.seen]
    return [re.sub(rf"/rounds/{number}\b", "/rounds/<n>", s) for s in shown]


def test_the_hub_sees_the_same_requests_whether_the_current_version_passes_here_or_not(
    site: Site,
) -> None:
    good = _round(site, site.good, evaluate=True)
    bad = _round(site, site.bad)  # neither of the two current versions was evaluated here
    better = _round(site, site.good)

    _set_head(site, bad)
    failing = _gate_requests(site, bad, 2)
    assert site.node.predict(NAME).version == good  # an earlier version was served
    _set_head(site, better)
    passing = _gate_requests(site, better, 3)

    assert failing == passing, (failing, passing)
    assert failing and not any(good in seen for seen in failing)
    assert [e.details["served"] for e in _events(site.node, "validation")] == [good, good, better]


def test_the_earlier_version_is_served_though_the_hub_would_not_serve_it(site: Site) -> None:
    good = _round(site, site.good, evaluate=True)
    bad = _round(site, site.bad)
    site.wire.refused.add(good)  # the hub answers nothing about the earlier version
    site.wire.seen.clear()

    scores = site.node.predict(NAME)

    assert scores.version == good and scores.current == bad and scores.scored
    assert not any(good in seen for seen in site.wire.seen)


def test_kept_weights_altered_on_disk_are_never_served(site: Site) -> None:
    good = _round(site, site.good, evaluate=True)
    bad = _round(site, site.bad)
    db = site.node.store.db
    altered = encode_arrays({k: v * 1.01 for k, v in site.good.items()})
    db.conn.execute("UPDATE kept_versions SET weights = ? WHERE version = ?", (altered, good))
    db.conn.commit()
    site.wire.seen.clear()

    with pytest.raises(ModelQualityError, match="do not hash to their kept address") as raised:
        site.node.predict(NAME)
    assert good[:12] in str(raised.value) and bad[:12] in str(raised.value)

    # with the kept sha256 made to match the altered weights: not the round's verified result
    digest = hashlib.sha256(altered).hexdigest()
    db.conn.execute("UPDATE kept_versions SET sha256 = ? WHERE version = ?", (digest, good))
    db.conn.commit()
    with pytest.raises(ModelQualityError, match="not round 1's verified result"):
        site.node.predict(NAME)
    assert [e.outcome for e in _events(site.node, "validation")] == ["refused", "refused"]
    assert _events(site.node, "predict") == []
    assert not any(good in seen for seen in site.wire.seen)


def test_a_verified_version_whose_weights_are_not_kept_is_skipped_without_asking_the_hub(
    site: Site,
) -> None:
    good = _round(site, site.good, evaluate=True)
    skipped = _round(site, site.bad, evaluate=True)
    bad = _round(site, site.bad)
    db = site.node.store.db  # as for a version evaluated before weights were kept
    db.conn.execute("DELETE FROM kept_versions WHERE version = ?", (skipped,))
    db.conn.commit()
    site.wire.seen.clear()

    scores = site.node.predict(NAME)

    assert scores.version == good and [o.version for o in scores.passed_over] == [bad, skipped]
    assert "not kept on this node" in scores.passed_over[1].failures[0]
    assert not any(good in seen or skipped in seen for seen in site.wire.seen)


def test_a_node_keeps_the_weights_of_its_last_versions_per_study(tmp_path: Path) -> None:
    from aipipe.node.kept_versions import KEPT_PER_STUDY, KeptVersions  # new with this test

    with Node.init(tmp_path / "n", "basel") as node:
        kept = KeptVersions(node.store)
        for number in range(1, KEPT_PER_STUDY + 3):
            kept.keep("chd", number, f"v{number}", b"w%d" % number)
        kept.keep("other", 1, "o1", b"o")
        assert kept.versions("chd") == [f"v{n}" for n in range(KEPT_PER_STUDY + 2, 2, -1)]
        assert kept.versions("other") == ["o1"]


def _pattern(weights: Arrays) -> bytes:
    return np.ascontiguousarray(weights["head.weight"]).tobytes()


def _found(home: Path, needle: bytes) -> list[str]:
    return [p.name for p in home.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_the_kept_weights_are_sealed_in_an_encrypted_home(site: Site, tmp_path: Path) -> None:
    _round(site, site.good, evaluate=True)  # the plain control
    plain = site.node.paths.home
    assert any(name.startswith("store.sqlite") for name in _found(plain, _pattern(site.good)))

    with _site(tmp_path / "sealed", AtRestKey.generate()) as sealed:
        good = _round(sealed, sealed.good, evaluate=True)
        bad = _round(sealed, sealed.bad)
        home = sealed.node.paths.home
        assert _found(home, _pattern(sealed.good)) == []
        [(raw,)] = sqlite3.connect(home / "store.sqlite").execute(
            "SELECT weights FROM kept_versions WHERE version = ?", (good,)
        )
        assert raw.startswith(MAGIC) and _pattern(sealed.good) not in raw
        scores = sealed.node.predict(NAME)  # and they open under the home's key
        assert scores.version == good and scores.current == bad
