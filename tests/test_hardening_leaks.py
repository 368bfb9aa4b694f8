"""What leaves a node besides its training update (issue 10, items 3 and 5; DESIGN §12).

- Under secure aggregation the signed header carries no quantity derived from the site's n:
  ε spent (a deterministic function of n through q = batch/n) stays on the node.
- A node evaluates only a version that is the result of a round it took part in, and sends the
  hub no evaluation numbers at all: a crafted model (w = 0, b = 1) scored on a test split gives
  the exact count of positive labels; exact n_test, accuracy, AUC and loss never leave.

The hub is the real app in-process (`tests.hub_support`); nodes are real `NodeWorker`s with real
stores, audit logs and identities, talking to it through `HubClient`.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aipipe.errors import StudyError
from aipipe.hub.models import version_id
from aipipe.node.client import HubClient
from aipipe.node.lineage import ModelLineage
from aipipe.node.secure_rounds import secagg_round
from aipipe.node.worker import NodeWorker
from aipipe.privacy.release import (
    COUNT_SENSITIVITY,
    evaluation_epsilon,
    noised_accuracy_counts,
)
from aipipe.secure.identity import Identity
from aipipe.secure.secagg import SecAggConfig
from aipipe.study.features import FeatureMatrix
from aipipe.study.preprocessing import Preprocessor
from aipipe.study.spec import StudySpec
from aipipe.wire import RoundWork, UpdateHeader, UpdateReceipt, unpack_frame
from aipipe.wire.tensors import encode_arrays
from tests.hub_support import STUDY, Hub, Node
from tests.secure_rounds_support import NAMES, ScriptedSecAggHub, _train, node_worker, secure_spec

EPSILON = 0.8123456789012345  # what the ledger would hand a round: ε spent after it
N_TRAIN = 50  # `_train`'s num_examples
N_TEST, POSITIVES = 20, 7


def spellings(value: float) -> list[bytes]:
    """A number as decimal text and as little-endian float64/float32: any in a message leaks."""
    return [
        repr(value).encode(),
        f"{value:.6f}".encode(),
        struct.pack("<d", value),
        struct.pack("<f", value),
    ]


# -- item 5: no n, no ε in what a secure node sends -------------------------------------------


class RecordingSecAggHub(ScriptedSecAggHub):
    """The scripted SecAgg+ hub of `secure_rounds_support`, keeping every byte the node sent."""

    def __init__(self, config: SecAggConfig, me: str, identities: dict[str, Identity]) -> None:
        super().__init__(config, me, identities)
        self.sent: list[bytes] = []
        self.headers: list[UpdateHeader] = []

    def secagg_post(self, study: str, number: int, step: str, message: Any) -> None:
        self.sent.append(message.model_dump_json().encode())
        super().secagg_post(study, number, step, message)

    def upload(self, study: str, number: int, body: bytes) -> UpdateReceipt:
        self.sent.append(body)
        self.headers.append(UpdateHeader.model_validate_json(unpack_frame(body)[0]))
        return super().upload(study, number, body)


@pytest.fixture
def secagg_sent(tmp_path: Path) -> RecordingSecAggHub:
    """Everything node-a sent in a 4-node SecAgg+ round it took part in after charging ε."""
    spec = StudySpec.model_validate(secure_spec("secagg-leaks", "secagg", min_nodes=3))
    identities = {n: Identity.generate() for n in NAMES}
    config = SecAggConfig.create(
        round_id=f"{spec.name}/1/{'0' * 16}", clients=list(NAMES), vector_length=5
    )
    hub = RecordingSecAggHub(config, "node-a", identities)
    item = RoundWork(
        kind="train",
        study=spec.name,
        study_digest="d" * 64,
        round=1,
        version="b" * 64,
        deadline="2999-01-01T00:00:00Z",
    )
    with node_worker(tmp_path / "node-a", "node-a", identities["node-a"], hub) as worker:
        outcome = secagg_round(worker, spec, item, _train, EPSILON)
    assert outcome.startswith("round 1: secagg update sent"), outcome
    return hub


def test_a_secure_nodes_signed_header_states_no_epsilon_delta_n_or_norm(
    secagg_sent: RecordingSecAggHub,
) -> None:
    (header,) = secagg_sent.headers

    assert header.epsilon_spent is None
    assert header.delta is None
    assert header.num_examples is None and header.update_norm is None
    assert header.train_loss is None


def test_nothing_a_secure_node_sends_holds_its_epsilon_spent(
    secagg_sent: RecordingSecAggHub,
) -> None:
    leaks = [p for p in spellings(EPSILON) for body in secagg_sent.sent if p in body]

    assert secagg_sent.sent and not leaks


def test_no_field_of_a_secure_header_equals_the_nodes_n_or_epsilon(
    secagg_sent: RecordingSecAggHub,
) -> None:
    (header,) = secagg_sent.headers
    values = [v for v in header.model_dump().values() if isinstance(v, int | float)]

    assert not [v for v in values if v in (N_TRAIN, EPSILON)], values
    assert values == [header.protocol, header.round]


def test_the_search_for_epsilon_would_find_a_planted_copy() -> None:
    """Control: the spellings above do find ε where it is written."""
    plantings = [
        json.dumps({"epsilon_spent": EPSILON}).encode(),  # as the old header carried it
        b"ab" + struct.pack("<d", EPSILON) + b"cd",
        b"ab" + struct.pack("<f", EPSILON) + b"cd",
        f"eps={EPSILON:.6f}".encode(),
    ]

    assert all(any(p in planted for p in spellings(EPSILON)) for planted in plantings)


# -- item 3: a crafted model is not evaluated; no evaluation number leaves ------------------------


def _matrix(spec: StudySpec) -> FeatureMatrix:
    """A site's split: 40 train rows, 20 test rows of which POSITIVES are positive."""
    rng = np.random.default_rng(3)
    columns = spec.columns()
    x_train, x_test = rng.normal(size=(40, len(columns))), rng.normal(size=(N_TEST, len(columns)))
    y_train = (rng.random(40) > 0.5).astype(np.float64)
    y_test = np.array([1.0] * POSITIVES + [0.0] * (N_TEST - POSITIVES))
    ids = [f"p{i}" for i in range(60)]
    prep = Preprocessor({}, None, None)
    return FeatureMatrix(columns, x_train, y_train, x_test, y_test, ids[:40], ids[40:], 60, prep)


@pytest.fixture
def trained(hub: Hub, tmp_path: Path) -> Iterator[tuple[Hub, dict[str, NodeWorker], str]]:
    """Round 1 of a plaintext study trained by alpha and beta (real workers) and closed."""
    study = hub.publish({**STUDY, "name": "leaks", "privacy": {"mode": "none"}})
    nodes = [hub.enrol("alpha"), hub.enrol("beta")]
    hub.open_round(study)
    with _workers(hub, nodes, study, tmp_path) as workers:
        for worker in workers.values():
            item = worker.client.work(wait_s=0)
            assert item.kind == "train", item
            worker.handle(item)
        info = hub.client.get("/v1/studies/leaks/rounds/1", headers=hub.admin).json()
        assert info["state"] == "closed", info
        yield hub, workers, info["result_version"]


@contextmanager
def _workers(
    hub: Hub, nodes: list[Node], study: dict[str, Any], root: Path
) -> Iterator[dict[str, NodeWorker]]:
    """A real worker per node (store, audit log, identity) that approved `study`; its
    features are a fixed split (`_matrix`) rather than ingested FHIR."""
    with ExitStack() as stack:
        workers = {}
        for node in nodes:
            client = HubClient(
                "http://testserver", token=node.credential, transport=hub.client._transport
            )
            stack.callback(client.close)
            worker = stack.enter_context(
                node_worker(root / node.name, node.name, node.identity, client)
            )
            worker.allow_non_private = True
            worker.store.approve(study["name"], study["digest"], json.dumps(study["spec"]))
            spec = StudySpec.model_validate(study["spec"])
            worker._features[spec.name] = _matrix(spec)
            workers[node.name] = worker
        yield workers


def _crafted(hub: Hub, parent: str, claimed_round: int) -> str:
    """A model w = 0, b = 1 (every patient scored positive) made the study's head outside any
    round, addressed as the hub addresses a round's result."""
    weights = hub.weights(parent)
    crafted = {k: np.ones_like(v) if "bias" in k else np.zeros_like(v) for k, v in weights.items()}
    store = hub.paths.open_store()
    try:
        blob = store.put_blob(encode_arrays(crafted))
        version = version_id("leaks", claimed_round, parent, blob)
        store.add_model(version, "leaks", claimed_round, parent, "fedavg", blob, {"round": 1})
        store.set_study_head("leaks", version, None)
    finally:
        store.close()
    return version


def _audit(worker: NodeWorker, action: str) -> list[Any]:
    return [e for e in worker.audit.events() if e.action == action]


@pytest.mark.parametrize("claimed_round", [1, 2])
def test_a_node_refuses_to_evaluate_a_crafted_version_and_sends_no_number(
    trained: tuple[Hub, dict[str, NodeWorker], str], claimed_round: int
) -> None:
    hub, workers, result = trained
    crafted = _crafted(hub, result, claimed_round)
    alpha = workers["alpha"]

    item = alpha.client.work(wait_s=0)
    assert (item.kind, item.version) == ("evaluate", crafted)
    alpha.handle(item)

    shown = hub.client.get(f"/v1/models/{crafted}", headers=hub.admin).json()["metrics"]
    assert [v for v in shown.get("alpha", {}).values() if v is not None] == []
    assert ModelLineage(alpha.store.db).evaluation("leaks", crafted) is None
    (refusal,) = _audit(alpha, "evaluate")
    assert refusal.outcome == "refused" and crafted[:12] in refusal.details["reason"]
    assert alpha.client.work(wait_s=0).kind == "idle"  # not offered again and again


def test_a_node_evaluates_its_rounds_result_and_keeps_the_numbers_home(
    trained: tuple[Hub, dict[str, NodeWorker], str],
) -> None:
    hub, workers, result = trained

    for worker in workers.values():
        item = worker.client.work(wait_s=0)
        assert (item.kind, item.version) == ("evaluate", result)
        worker.handle(item)

    shown = hub.client.get(f"/v1/models/{result}", headers=hub.admin).json()["metrics"]
    assert sorted(shown) == ["alpha", "beta"]
    assert [v for m in shown.values() for v in m.values() if v is not None] == []
    kept = ModelLineage(workers["alpha"].store.db).evaluation("leaks", result)
    assert kept is not None and kept.n == N_TEST and 0 <= kept.accuracy <= 1
    assert _audit(workers["alpha"], "evaluate")[0].outcome == "success"


def test_a_second_result_for_a_round_already_evaluated_is_refused(
    trained: tuple[Hub, dict[str, NodeWorker], str],
) -> None:
    hub, workers, result = trained
    alpha = workers["alpha"]
    alpha.handle(alpha.client.work(wait_s=0))  # pins round 1's result
    crafted = _crafted(hub, result, 1)
    store = hub.paths.open_store()
    try:  # the hub now also claims the crafted version as round 1's result
        store.set_round_state("leaks", 1, "closed", result_version=crafted)
    finally:
        store.close()

    alpha.handle(alpha.client.work(wait_s=0))

    assert ModelLineage(alpha.store.db).evaluation("leaks", crafted) is None
    assert "already produced version" in _audit(alpha, "evaluate")[-1].details["reason"]


# -- the DP release the ledger will charge ----------------------------------------------------


def test_noised_accuracy_counts_have_the_stated_spread_around_the_true_counts() -> None:
    rng = np.random.default_rng(0)
    draws = [noised_accuracy_counts(200, 150, 2.0, rng) for _ in range(4000)]
    n = np.array([d.n for d in draws])

    assert abs(n.mean() - 200) < 0.3
    assert abs(n.std() - 2.0 * COUNT_SENSITIVITY) < 0.1
    assert all(d.accuracy is None or 0 <= d.accuracy <= 1 for d in draws)


def test_a_release_costs_the_epsilon_of_one_unsampled_gaussian_step() -> None:
    loose, tight = evaluation_epsilon(2.0, 1e-5, "rdp"), evaluation_epsilon(8.0, 1e-5, "rdp")

    assert tight < loose < 3.0


def test_an_unnoised_release_is_refused() -> None:
    with pytest.raises(ValueError, match="noise multiplier > 0"):
        noised_accuracy_counts(10, 5, 0.0, np.random.default_rng(0))


class DeclineRecorder:
    """Stands in for `HubClient` where a node declines a round: keeps the reasons it sends."""

    def __init__(self) -> None:
        self.reasons: list[str] = []

    def decline(self, study: str, number: int, reason: str, *, exclude: bool) -> None:
        self.reasons.append(reason)


@pytest.mark.parametrize("mode", ["secagg", "ckks"])
def test_a_secure_nodes_decline_names_no_count_of_its_site(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    spec = StudySpec.model_validate(secure_spec("declines", mode))
    counted = StudyError(
        "study 'declines' keeps 3 of 187 patients after dropping rows with missing features"
    )

    def extract(store: object, study: object) -> FeatureMatrix:
        raise counted  # what `aipipe.study.features.extract` says of a sparse site

    monkeypatch.setattr("aipipe.node.extraction.extract", extract)
    hub = DeclineRecorder()
    item = RoundWork(
        kind="train", study=spec.name, study_digest=spec.digest(), round=1, version="b" * 64
    )
    with node_worker(tmp_path / "a", "node-a", Identity.generate(), hub) as worker:
        worker.store.approve(spec.name, spec.digest(), spec.model_dump_json())
        worker.handle(item)
        (refusal,) = _audit(worker, "train")

    (reason,) = hub.reasons
    assert "187" not in reason and "3 of" not in reason
    assert reason.startswith("StudyError")
    assert refusal.details["reason"] == str(counted)  # the full reason stays on the node


def test_a_plaintext_nodes_decline_keeps_its_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Control: in a plaintext study (where n travels with the update) the reason is sent."""
    spec = StudySpec.model_validate({**secure_spec("declines", "secagg"), "secure": "none"})

    def extract(store: object, study: object) -> FeatureMatrix:
        raise StudyError("keeps 3 of 187 patients")

    monkeypatch.setattr("aipipe.node.extraction.extract", extract)
    hub = DeclineRecorder()
    item = RoundWork(
        kind="train", study=spec.name, study_digest=spec.digest(), round=1, version="b" * 64
    )
    with node_worker(tmp_path / "a", "node-a", Identity.generate(), hub) as worker:
        worker.store.approve(spec.name, spec.digest(), spec.model_dump_json())
        worker.handle(item)

    assert hub.reasons == ["keeps 3 of 187 patients"]
