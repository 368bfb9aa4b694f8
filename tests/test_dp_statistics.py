"""Preprocessing statistics under DP (issue 10, item 4).

A node's per-site statistics for hub-side CDS leave only as the Gaussian mechanism's noised
count, Σx and Σx² of range-clipped columns, charged to the site ledger with their exact bytes
before they leave; a re-offer sends those same bytes; the training plan that follows composes
them. Real node stores (Switzerland's FHIR data), a real worker and the in-process hub.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from aipipe.node.client import HubClient
from aipipe.node.home import init_node, open_audit, open_store
from aipipe.node.ingest import ingest_files
from aipipe.node.worker import NodeWorker
from aipipe.privacy import BudgetLedger, compose_epsilon
from aipipe.privacy.statistics import noise_multiplier, release, sensitivity
from aipipe.study.features import extract
from aipipe.study.spec import StudySpec
from aipipe.wire import FeatureStats, RoundWork
from tests.e2e_support import HEART
from tests.hub_support import Hub, Node, running_hub

DELTA = 1e-5


def _heart_spec(**privacy: Any) -> dict[str, Any]:
    raw: dict[str, Any] = yaml.safe_load((HEART / "study.yaml").read_text())
    return {**raw, "secure": "none", "privacy": {**raw["privacy"], **privacy}}


@dataclass
class Site:
    hub: Hub
    study: dict[str, Any]
    item: RoundWork
    worker: NodeWorker
    sent: list[Any]  # what the worker's client posted as statistics, as it was passed
    node: Node

    def restarted(self) -> NodeWorker:
        """A fresh worker on the same store and client: the node daemon started again."""
        w = self.worker
        return NodeWorker(w.name, w.store, w.client, w.identity, w.audit)

    @property
    def ledger(self) -> BudgetLedger:
        return BudgetLedger(self.worker.store.db)


@contextmanager
def _site(tmp_path: Path, spec: dict[str, Any]) -> Iterator[Site]:
    """The in-process hub with three nodes and the study's first round open, and alpha's real
    home (Switzerland's FHIR data, the study approved, a share of ε = 1)."""
    with running_hub(tmp_path / "hub") as hub:
        alpha = hub.enrol("alpha")
        hub.enrol("beta"), hub.enrol("gamma")
        study = hub.publish(spec)
        at = hub.open_round(study)
        item = at.train_item()
        paths = init_node(tmp_path / "alpha", "alpha")
        store, audit = open_store(paths), open_audit(paths)
        ingest_files(store, [HEART / "fhir" / "switzerland"])
        store.approve(study["name"], study["digest"], json.dumps(study["spec"]))
        BudgetLedger(store.db).set_budget(study["name"], epsilon=1.0, delta=DELTA)
        client = HubClient(
            "http://testserver", token=alpha.credential, transport=hub.client._transport
        )
        sent: list[Any] = []
        report = client.report_stats

        def recording(name: str, body: Any) -> None:
            sent.append(body)
            report(name, body)

        client.report_stats = recording  # type: ignore[method-assign, assignment]
        try:
            yield Site(
                hub,
                study,
                item,
                NodeWorker("alpha", store, client, alpha.identity, audit),
                sent,
                alpha,
            )
        finally:
            store.close()
            audit.close()


def _pooled_rows(hub: Hub, study: dict[str, Any]) -> list[dict[str, Any]]:
    store = hub.paths.open_store()
    try:
        return store.feature_stats(study["name"], study["digest"])
    finally:
        store.close()


def test_the_statistics_a_node_sends_are_noised_and_do_not_give_the_exact_counts(
    tmp_path: Path,
) -> None:
    with _site(tmp_path, _heart_spec()) as site:
        site.worker.handle(site.item)
        spec = StudySpec.model_validate(site.study["spec"])
        exact = extract(site.worker.store, spec)
        pooled = _pooled_rows(site.hub, site.study)

    (body,) = site.sent
    stats = FeatureStats.model_validate_json(body)
    sex = spec.columns().index("sex")
    mean, std = exact.preprocessor.mean, exact.preprocessor.std
    assert mean is not None and std is not None
    raw = exact.x_train * (std + 1e-9) + mean
    males = float(np.round(raw[:, sex]).sum())
    assert stats.n != len(exact.train_ids)
    assert abs(stats.sums[sex] - males) > 1e-6  # not the exact count of male patients
    assert not float(stats.sums[sex]).is_integer()
    assert [r["n"] for r in pooled] == [stats.n]  # what the hub keeps is the noised release


def test_the_release_is_charged_as_statistics_with_the_digest_of_the_bytes_sent(
    tmp_path: Path,
) -> None:
    with _site(tmp_path, _heart_spec(statistics_epsilon=0.2)) as site:
        site.worker.handle(site.item)
        released = site.ledger.released(site.study["name"], "statistics", 0)

    assert released is not None
    entry, kept = released
    (body,) = site.sent
    assert entry.digest == hashlib.sha256(body).hexdigest() and kept == body
    assert (entry.sample_rate, entry.steps) == (1.0, 1)
    assert entry.noise_multiplier == pytest.approx(noise_multiplier(0.2, DELTA, "prv"))
    assert entry.epsilon == pytest.approx(0.2, rel=1e-2)  # the ε the study declared for them


def test_a_restarted_node_sends_the_same_statistics_bytes_and_is_charged_once(
    tmp_path: Path,
) -> None:
    with _site(tmp_path, _heart_spec()) as site:
        site.worker.handle(site.item)
        site.restarted().features(StudySpec.model_validate(site.study["spec"]))
        entries = [e for e in site.ledger.entries(site.study["name"]) if e.kind == "statistics"]

    assert len(site.sent) == 2
    assert site.sent[1] == site.sent[0]  # the same bytes, not a new draw
    assert len(entries) == 1


def test_the_training_plan_leaves_room_for_the_statistics_within_the_studys_share(
    tmp_path: Path,
) -> None:
    with _site(tmp_path, _heart_spec()) as site:
        summary = site.worker.handle(site.item)
        entries = site.ledger.entries(site.study["name"])

    stats, train = entries
    spec = StudySpec.model_validate(site.study["spec"])
    planned = spec.training.rounds * spec.training.local_steps
    whole = compose_epsilon(
        [
            (stats.noise_multiplier, 1.0, 1),
            (train.noise_multiplier, train.sample_rate, planned),
        ],
        DELTA,
        "prv",
    )
    assert "sent update" in summary, summary
    assert (stats.kind, train.kind) == ("statistics", "train")
    assert 0.98 < whole <= 1.0  # statistics and every planned round within the share of 1.0


def test_a_study_whose_features_lack_a_range_releases_no_statistics(tmp_path: Path) -> None:
    spec = _heart_spec()
    spec["features"] = [{k: v for k, v in f.items() if k != "range"} for f in spec["features"]]
    with _site(tmp_path, spec) as site:
        summary = site.worker.handle(site.item)
        entries = site.ledger.entries(site.study["name"])
        posted = site.hub.client.post(
            f"/v1/studies/{site.study['name']}/stats",
            json={"study_digest": site.study["digest"], "n": 30.0, "sums": [], "squares": []},
            headers=site.node.headers,
        )

    assert "sent update" in summary, summary
    assert site.sent == []
    assert [e.kind for e in entries] == ["train"]
    assert posted.status_code == 409 and "served at the nodes" in posted.json()["detail"]


def test_the_noise_of_a_release_has_the_calibrated_scale() -> None:
    x = np.zeros((50, 3))
    z = noise_multiplier(0.5, DELTA, "prv")

    counts = [release(x, [(0.0, 1.0)] * 3, multiplier=z, max_rows=1000).n for _ in range(400)]

    expected = z * sensitivity(3)  # σ = z·√(1 + 2d)
    assert np.mean(counts) == pytest.approx(50, abs=4 * expected / 20)
    assert np.std(counts) == pytest.approx(expected, rel=0.15)
