"""Issue 11 item 9: a model version is served only once it meets the study's validation minimum.

- A node serves (`serve-cds`, `predict`) only a version that its own evaluation on its held-out
  split (exact, lineage-verified, kept on the node) finds at or above the study's `validation:`
  minimum; otherwise it refuses, saying which metric failed by how much, and audits it.
- What leaves a node for the hub's gate is a DP-noised (label × probability bin) histogram,
  charged to the site ledger with its exact bytes before it is sent.
- The hub's CDS serves the newest version whose pooled (noised) metrics meet the minimum.

Real hub (in-process app), real node workers and stores; each site's data is a fixed matrix
whose labels follow a known logistic model, so "good" and "inverted" versions are known.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aipipe.cds.model_card import model_card
from aipipe.errors import ConflictError, StudyError
from aipipe.hub.cds import HubCdsProvider
from aipipe.hub.models import version_id
from aipipe.hub.service import HubService
from aipipe.node.cds import node_cds_app
from aipipe.node.client import HubClient
from aipipe.node.lineage import ModelLineage
from aipipe.node.stats_release import report_stats
from aipipe.node.validation import require_servable
from aipipe.node.worker import NodeWorker
from aipipe.privacy.engine import VALIDATION
from aipipe.privacy.ledger import BudgetLedger
from aipipe.privacy.statistics import noise_multiplier
from aipipe.study.features import FeatureMatrix
from aipipe.study.preprocessing import Preprocessor
from aipipe.study.spec import StudySpec
from aipipe.study.validation import ModelQualityError
from aipipe.wire import EvalReport
from aipipe.wire.messages import CalibrationHistogram
from aipipe.wire.tensors import encode_arrays
from tests.hub_support import STUDY, Hub, running_hub
from tests.secure_rounds_support import node_worker

W_TRUE = np.array([2.0, -1.5])
NAME = "valid"
VALIDATION_STUDY: dict[str, Any] = {
    **STUDY,
    "name": NAME,
    "features": [
        {"name": "age", "codes": ["loinc|30525-0"], "range": [-10, 10]},
        {"name": "chol", "codes": ["loinc|2093-3"], "range": [-10, 10]},
    ],
    "privacy": {"mode": "dp", "epsilon": 20.0, "accountant": "rdp"},
    "training": {"rounds": 2, "local_steps": 3, "batch_size": 8},
    "validation": {"min_auc": 0.7, "max_calibration_error": 0.15, "min_patients": 50,
                   "epsilon": 2.0},
}  # fmt: skip


def _matrix(spec: StudySpec, seed: int) -> FeatureMatrix:
    """60 train and 200 test patients whose labels follow P(y) = σ(x·W_TRUE)."""
    rng = np.random.default_rng(seed)
    x_train = rng.normal(size=(60, 2)).astype(np.float32)
    x_test = rng.normal(size=(200, 2)).astype(np.float32)

    def labels(x: np.ndarray) -> np.ndarray:
        p = 1 / (1 + np.exp(-(x.astype(np.float64) @ W_TRUE)))
        return np.asarray(rng.random(len(x)) < p, np.float64)

    ids = [f"p{i}" for i in range(260)]
    prep = Preprocessor({}, None, None)
    return FeatureMatrix(spec.columns(), x_train, labels(x_train), x_test, labels(x_test),
                         ids[:60], ids[60:], 260, prep)  # fmt: skip


GOOD = {"head.weight": W_TRUE[None].astype(np.float32), "head.bias": np.zeros(1, np.float32)}
INVERTED = {"head.weight": -W_TRUE[None].astype(np.float32), "head.bias": np.zeros(1, np.float32)}


@contextmanager
def _federation(tmp_path: Path) -> Iterator[tuple[Hub, dict[str, Any], dict[str, NodeWorker]]]:
    """A hub with the study published and two real workers that approved it (budget set),
    hold their fixed split."""
    with running_hub(tmp_path / "hub") as hub, ExitStack() as stack:
        study = hub.publish(VALIDATION_STUDY)
        spec = StudySpec.model_validate(study["spec"])
        workers = {}
        for seed, name in enumerate(["alpha", "beta"]):
            node = hub.enrol(name)
            client = HubClient(
                "http://testserver", token=node.credential, transport=hub.client._transport
            )
            stack.callback(client.close)
            worker = stack.enter_context(node_worker(tmp_path / name, name, node.identity, client))
            worker.store.approve(NAME, study["digest"], json.dumps(study["spec"]))
            BudgetLedger(worker.store.db).set_budget(NAME, epsilon=20.0, delta=1e-5)
            worker._features[NAME] = _matrix(spec, seed)
            workers[name] = worker
        yield hub, study, workers


def _round(hub: Hub, workers: dict[str, NodeWorker], weights: dict[str, np.ndarray]) -> str:
    """One real round trained by the workers (after releasing their DP preprocessing
    statistics, as extracting the features does), whose result is then replaced by `weights`,
    addressed as the hub addresses a round's result (so it passes the nodes' lineage check)."""
    response = hub.post_round(NAME)
    assert response.status_code == 200, response.text
    number, base = response.json()["round"], response.json()["base_version"]
    for worker in workers.values():
        item = worker.client.work(wait_s=0)
        assert item.kind == "train", item
        spec = worker.approved_spec(NAME, None)  # the DP statistics `features()` releases
        report_stats(worker, spec, worker._features[NAME])
        worker.handle(item)
    store = hub.paths.open_store()
    try:
        blob = store.put_blob(encode_arrays(weights))
        version = version_id(NAME, number, base, blob)
        store.add_model(version, NAME, number, base, "fedavg", blob, {"round": number})
        store.set_round_state(NAME, number, "closed", result_version=version)
        store.set_study_head(NAME, version, None)
    finally:
        store.close()
    return version


def _evaluate(workers: dict[str, NodeWorker], version: str) -> None:
    for worker in workers.values():
        item = worker.client.work(wait_s=0)
        assert (item.kind, item.version) == ("evaluate", version), item
        worker.handle(item)


def _gate(worker: NodeWorker, version: str, use: str = "cds") -> Any:
    spec = worker.approved_spec(NAME, None)
    raw = worker.client.model_weights(version)
    return require_servable(worker.store, worker.client, spec, version, raw, audit=worker.audit,
                            actor=worker.name, use=use, features=worker.features)  # fmt: skip


def _serve_cds(worker: NodeWorker) -> object:
    """What `aipipe node serve-cds --study valid` builds."""
    return node_cds_app(worker.store, worker.client, [NAME], worker.audit, pseudonym_key=b"k" * 32,
                        jwt=None, allow_unauthenticated=True, actor=worker.name)  # fmt: skip


def _events(worker: NodeWorker, action: str) -> list[Any]:
    return [e for e in worker.audit.events() if e.action == action]


# -- the node's gate -----------------------------------------------------------------------------


def test_a_node_refuses_to_serve_or_predict_with_a_version_below_the_minimum(
    tmp_path: Path,
) -> None:
    with _federation(tmp_path) as (hub, _, workers):
        inverted = _round(hub, workers, INVERTED)
        _evaluate(workers, inverted)
        alpha = workers["alpha"]

        with pytest.raises(ModelQualityError, match=r"AUC 0\.\d+ is below the study's min_auc "
                           r"0\.700 \(short by 0\.\d+\)"):  # fmt: skip
            _serve_cds(alpha)
        with pytest.raises(ModelQualityError, match="calibration error"):
            _gate(alpha, inverted, use="writeback")

        refusals = _events(alpha, "validation")
        assert [e.outcome for e in refusals] == ["refused", "refused"]
        assert [e.details["use"] for e in refusals] == ["cds", "writeback"]
        assert "min_auc" in refusals[0].details["failures"][0]


def test_a_node_serves_a_version_that_meets_the_minimum(tmp_path: Path) -> None:
    with _federation(tmp_path) as (hub, _, workers):
        good = _round(hub, workers, GOOD)
        _evaluate(workers, good)
        alpha = workers["alpha"]

        served = _gate(alpha, good, use="predict")
        report = served.report
        assert served.version == good and report is not None
        assert report.passed and report.auc > 0.7 and report.source == "exact"
        # serve-cds goes past the gate to the site's own preprocessing (none ingested here)
        with pytest.raises(StudyError, match="no patients") as raised:
            _serve_cds(alpha)
        assert not isinstance(raised.value, ModelQualityError)
        kept = ModelLineage(alpha.store.db).evaluation(NAME, good)
        assert kept is not None and kept.validation is not None
        assert kept.validation["calibration_error"] <= 0.15 and len(kept.validation["bins"]) == 10
        assert [e.outcome for e in _events(alpha, "validation")] == ["success", "success"]


def test_a_version_not_yet_evaluated_is_evaluated_lineage_checked_before_it_is_served(
    tmp_path: Path,
) -> None:
    with _federation(tmp_path) as (hub, _, workers):
        inverted = _round(hub, workers, INVERTED)
        alpha = workers["alpha"]
        assert ModelLineage(alpha.store.db).evaluation(NAME, inverted) is None

        with pytest.raises(ModelQualityError, match="min_auc"):
            _gate(alpha, inverted)
        assert ModelLineage(alpha.store.db).evaluation(NAME, inverted) is not None

        crafted = _crafted_outside_rounds(hub, inverted)
        with pytest.raises(ModelQualityError, match="cannot validate it"):
            _gate(alpha, crafted)


def _crafted_outside_rounds(hub: Hub, parent: str) -> str:
    store = hub.paths.open_store()
    try:
        blob = store.put_blob(encode_arrays(GOOD))
        version = version_id(NAME, 7, parent, blob)
        store.add_model(version, NAME, 7, parent, "fedavg", blob, {"round": 7})
    finally:
        store.close()
    return version


# -- what leaves the node for the hub's gate ----------------------------------------------------


def test_the_validation_histogram_is_noised_and_charged_to_the_ledger_before_it_leaves(
    tmp_path: Path,
) -> None:
    with _federation(tmp_path) as (hub, _, workers):
        good = _round(hub, workers, GOOD)
        ledger = BudgetLedger(workers["alpha"].store.db)
        spent_before = ledger.spent(NAME)

        _evaluate(workers, good)

        (entry,) = [e for e in ledger.entries(NAME) if e.kind == VALIDATION]
        assert entry.round == 1 and entry.sample_rate == 1.0 and entry.steps == 1
        assert entry.noise_multiplier == pytest.approx(noise_multiplier(2.0, 1e-5, "rdp"))
        assert ledger.spent(NAME) > spent_before
        sent = hub.client.get(f"/v1/models/{good}", headers=hub.admin).json()["metrics"]["alpha"]
        histogram = CalibrationHistogram.model_validate(sent["calibration"])
        assert hashlib.sha256(histogram.model_dump_json().encode()).hexdigest() == entry.digest
        counts = [*histogram.negatives, *histogram.positives]
        assert any(c != round(c) for c in counts)  # noised, not the exact counts
        assert sum(counts) == pytest.approx(200, abs=40)
        assert [v for k, v in sent.items() if k != "calibration" and v is not None] == []


def test_a_histogram_the_budget_refuses_is_not_sent(tmp_path: Path) -> None:
    with _federation(tmp_path) as (hub, _, workers):
        good = _round(hub, workers, GOOD)
        alpha = workers["alpha"]
        ledger = BudgetLedger(alpha.store.db)
        ledger.set_budget(NAME, epsilon=ledger.spent(NAME) + 0.01, delta=1e-5)

        _evaluate(workers, good)

        shown = hub.client.get(f"/v1/models/{good}", headers=hub.admin).json()["metrics"]
        assert shown["alpha"]["calibration"] is None and shown["beta"]["calibration"] is not None
        assert [e for e in ledger.entries(NAME) if e.kind == VALIDATION] == []
        assert _events(alpha, VALIDATION)[-1].outcome == "refused"


# -- the hub's gate -------------------------------------------------------------------------------


def test_the_hub_serves_only_the_newest_version_that_met_the_minimum(tmp_path: Path) -> None:
    with _federation(tmp_path) as (hub, _, workers):
        service: HubService = hub.client.app.state.service  # type: ignore[attr-defined]
        provider = HubCdsProvider(service)
        good = _round(hub, workers, GOOD)
        assert provider.services() == []  # trained, but no site has released its validation
        _evaluate(workers, good)
        assert {e.model_version for e in provider.services()} == {good}

        inverted = _round(hub, workers, INVERTED)
        _evaluate(workers, inverted)

        assert {e.model_version for e in provider.services()} == {good}
        head, reason = provider.withheld[NAME]
        assert head == inverted and "min_auc" in reason
        shown = hub.client.get(f"/v1/models/{inverted}", headers=hub.admin).json()["validation"]
        assert shown["passed"] is False and shown["source"] == "dp" and shown["sites"] == 2
        assert shown["failures"][0].startswith("AUC ")
        passed = hub.client.get(f"/v1/models/{good}", headers=hub.admin).json()["validation"]
        assert passed["passed"] is True and passed["auc"] > 0.7 and passed["epsilon"] == 2.0
        assert len(passed["bins"]) == 10
        withheld = hub.events("cds.withheld")
        assert withheld[-1].details["served"] == good
        # the model card a CDS card links to shows the served version's pooled validation
        card = model_card(provider.services()[0])
        assert card is not None and card.model_version == good
        assert card.validation is not None and card.validation["passed"] is True
        assert card.validation["source"] == "dp" and len(card.validation["bins"]) == 10


def test_a_histogram_the_study_did_not_ask_for_is_refused(tmp_path: Path) -> None:
    with _federation(tmp_path) as (hub, study, workers):
        good = _round(hub, workers, GOOD)
        alpha = workers["alpha"]
        wrong = CalibrationHistogram(study_digest=study["digest"], negatives=[1.0] * 4,
                                     positives=[1.0] * 4, epsilon=1.0, delta=1e-5)  # fmt: skip
        with pytest.raises(ConflictError, match="4 bins"):
            alpha.client.report(EvalReport(version=good, calibration=wrong))
