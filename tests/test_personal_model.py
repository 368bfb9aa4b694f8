"""Issue 13: a site's personal model — made when a round's result is evaluated, kept in the node
store with the global version it came from, audited, chosen on validation, used by `node
predict` and the node's CDS, never sent to the hub.

Real node homes (`init_node`, enrolled with their own keys) over the shipped heart-disease FHIR
data (Cleveland and Switzerland), a real hub app in-process, one real round trained and
evaluated by the nodes' own workers (module-scoped: the tests read it, and what they add is
saved under versions of their own).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from aipipe.audit.log import AuditLog
from aipipe.cds import FhirAccess
from aipipe.errors import ConfigError
from aipipe.node.cds import node_cds_app
from aipipe.node.client import HubClient
from aipipe.node.home import init_node, node_vault
from aipipe.node.lineage import ModelLineage
from aipipe.node.node import Node
from aipipe.node.personal import PersonalModels, served_personal
from aipipe.node.predict import predict_cohort
from aipipe.personalization import registry
from aipipe.personalization.finetune import FineTuning
from aipipe.secure.identity import Identity
from aipipe.settings import NodePaths
from aipipe.store.node_store import NodeStore
from aipipe.study.spec import StudySpec
from aipipe.study.validation import ModelQualityError, exact_report
from aipipe.wire import EnrolRequest, EvaluateWork, RoundWork
from aipipe.wire.secure import sealing_key_payload
from aipipe.wire.tensors import encode_arrays
from tests.cds_support import FHIR, PID, Fhir, cleveland_records, hook_request, prefetch_for
from tests.hub_support import Hub, running_hub
from tests.personal_support import (
    FHIR_DIR,
    NAME,
    personal_study,
    save_personal,
    shifted,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SERVICE = f"{NAME}-patient-view"
SHIFTED = "5" * 64  # the global version a hand-made personal model names


@dataclass
class Federation:
    hub: Hub
    spec: StudySpec
    version: str  # round 1's result
    nodes: dict[str, Node]
    homes: dict[str, Path]


def _enrol(hub: Hub, paths: NodePaths) -> str:
    """Register the home's own identity and sealing key, as `aipipe node init --token` does."""
    token = hub.issue_token(paths.config.name)
    identity = Identity.load(paths.identity_key, at_rest=paths.at_rest)  # sealed home too
    sealing = node_vault(paths).sealing_public()
    body = EnrolRequest(
        node=token.node, secret=token.secret, public_key=identity.public_hex,
        sealing_key=sealing.hex(),
        sealing_signature=identity.sign(sealing_key_payload(token.node, sealing)).hex(),
    )  # fmt: skip
    response = hub.client.post("/v1/enrol", json=body.model_dump())
    assert response.status_code == 200, response.text
    return str(response.json()["credential"])


def _work(nodes: dict[str, Node], kind: str) -> None:
    """Each node does its next work item, then what it does when idle (its personal model)."""
    for node in nodes.values():
        worker = node.worker(lambda line: None)
        item = node.hub.work(wait_s=0)
        assert isinstance(item, EvaluateWork | RoundWork) and item.kind == kind, item
        worker.handle(item)
        worker.make_personal()


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    root = tmp_path_factory.mktemp("personal")
    with ExitStack() as stack:
        hub = stack.enter_context(running_hub(root / "hub"))
        study = hub.publish(personal_study())
        nodes, homes = {}, {}
        for name, site in (("cleveland", "cleveland"), ("basel", "switzerland")):
            paths = init_node(root / name, name)
            client = HubClient("http://testserver", token=_enrol(hub, paths),
                               transport=hub.client._transport)  # fmt: skip
            node = stack.enter_context(Node.open(paths.home, hub=client))
            node.ingest_files([FHIR_DIR / site])
            node.approve(NAME)
            nodes[name], homes[name] = node, paths.home
        assert hub.post_round(NAME).status_code == 200
        _work(nodes, "train")
        version = hub.client.get(f"/v1/studies/{NAME}", headers=hub.admin).json()
        version = version["current_version"]
        _work(nodes, "evaluate")
        yield Federation(hub, StudySpec.model_validate(study["spec"]), version, nodes, homes)


def _events(node: Node, action: str) -> list[Any]:
    return [e for e in node.audit.events() if e.action == action]


# -- made and kept ----------------------------------------------------------------------------


def test_evaluating_a_result_keeps_a_personal_model_with_its_version_and_audits_it(
    federation: Federation,
) -> None:
    node = federation.nodes["cleveland"]
    matrix = node.worker(lambda line: None).features(federation.spec)
    mine = PersonalModels(node.store.db).get(NAME, federation.version)

    assert mine is not None and mine.round == 1 and mine.method == "finetune"
    assert mine.sha256 == hashlib.sha256(encode_arrays(mine.weights)).hexdigest()
    assert mine.validation.n == len(matrix.y_val) > 0  # chosen on the validation split
    assert mine.test.n == len(matrix.y_test)  # evaluated on the test split, kept here
    assert mine.report is not None and mine.report["n"] == len(matrix.y_test)
    global_weights = federation.hub.weights(federation.version)
    assert not np.allclose(mine.weights["head.weight"], global_weights["head.weight"])
    [event] = [e for e in _events(node, "personal.model") if e.details["version"] == mine.version]
    assert event.details == {"study": NAME, "version": federation.version,
                             "sha256": mine.sha256, "method": "finetune",
                             "chosen": mine.chosen}  # fmt: skip
    assert 0 < mine.chosen["steps"] <= 20  # a DP global model: fine-tuning on site data helps


def test_nothing_of_the_personal_model_reaches_the_hub(federation: Federation) -> None:
    """The acknowledgement is the one a study without personalization sends; no file of the hub
    holds the personal weights' bytes (a planted copy is found: the search works)."""
    sent = federation.hub.client.get(f"/v1/models/{federation.version}",
                                     headers=federation.hub.admin).json()["metrics"]  # fmt: skip
    assert set(sent) == {"cleveland", "basel"}
    assert all(v is None for report in sent.values() for v in report.values())
    root = federation.hub.paths.home
    for name, node in federation.nodes.items():
        mine = PersonalModels(node.store.db).get(NAME, federation.version)
        assert mine is not None
        needles = [mine.weights["head.weight"].tobytes(), encode_arrays(mine.weights)]
        assert _found(root, needles) == [], name
    planted = root / "planted.bin"
    planted.write_bytes(b"x" + needles[0] + b"y")
    assert _found(root, needles) == [planted]
    planted.unlink()


def _found(root: Path, needles: list[bytes]) -> list[Path]:
    return [
        path
        for path in sorted(root.rglob("*"))
        if path.is_file() and any(needle in path.read_bytes() for needle in needles)
    ]


def test_a_personal_model_survives_reopening_the_node(federation: Federation) -> None:
    kept = PersonalModels(federation.nodes["basel"].store.db).get(NAME, federation.version)
    assert kept is not None
    with Node.open(federation.homes["basel"]) as reopened:
        again = PersonalModels(reopened.store.db).get(NAME, federation.version)
    assert again is not None and again.sha256 == kept.sha256 and again.chosen == kept.chosen
    assert all(np.array_equal(again.weights[k], kept.weights[k]) for k in kept.weights)


# -- chosen on validation ---------------------------------------------------------------------


def test_the_served_personal_model_is_the_best_on_validation_not_on_test(
    store: NodeStore,
) -> None:
    spec = StudySpec.model_validate(personal_study())
    weights = {"head.weight": np.zeros((1, 13), np.float32), "head.bias": np.zeros(1, np.float32)}
    save_personal(store.db, spec, weights, version="a" * 64, number=1, val_loss=0.7,
                  test_loss=0.1)  # fmt: skip
    best = save_personal(store.db, spec, shifted(weights, 1.0), version="b" * 64, number=2,
                         val_loss=0.4, test_loss=0.9)  # fmt: skip
    save_personal(store.db, spec, shifted(weights, 2.0), version="c" * 64, number=3,
                  val_loss=0.5, test_loss=0.05)  # fmt: skip

    served = PersonalModels(store.db).served(NAME)
    assert served is not None and served.sha256 == best.sha256 and served.version == "b" * 64
    assert PersonalModels(store.db).latest(NAME).version == "c" * 64  # type: ignore[union-attr]


def test_the_gate_judges_the_personal_models_own_test_evaluation(
    store: NodeStore, tmp_path: Path
) -> None:
    strict = StudySpec.model_validate(personal_study(validation={"min_auc": 0.9}))
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200).astype(np.float64)
    weak = exact_report(labels, np.clip(0.5 + 0.1 * (labels - 0.5) + rng.normal(0, 0.2, 200),
                                        0, 1), 10).as_card()  # fmt: skip
    weights = {"head.weight": np.zeros((1, 13), np.float32), "head.bias": np.zeros(1, np.float32)}
    mine = save_personal(store.db, strict, weights, version="d" * 64, val_loss=0.3, report=weak)
    with AuditLog.open(tmp_path / "audit.sqlite", Identity.generate()) as audit:
        with pytest.raises(ModelQualityError, match=r"personal model .* min_auc"):
            served_personal(store, strict, audit=audit, actor="basel", use="predict")
        [event] = [e for e in audit.events() if e.action == "validation"]
    assert event.outcome == "refused" and event.details["personal"] == mine.sha256


# -- used -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moved(federation: Federation) -> dict[str, np.ndarray]:
    """Cleveland's served personal model: its own model with the head damped and its bias moved
    away from the global model's score of PID, saved with the lowest validation loss, so that
    its probabilities differ from the global model's."""
    node = federation.nodes["cleveland"]
    mine = PersonalModels(node.store.db).get(NAME, federation.version)
    assert mine is not None
    global_ = _probabilities(node, federation.spec, federation.hub.weights(federation.version))
    weights = shifted(mine.weights, -1.0 if global_[PID] > 0.5 else 1.0)
    weights["head.bias"] -= mine.weights["head.bias"]
    weights["head.weight"] *= 0.1
    save_personal(node.store.db, federation.spec, weights, version=SHIFTED, val_loss=0.0)
    return weights


def test_node_predict_scores_with_the_personal_model(
    federation: Federation, moved: dict[str, np.ndarray]
) -> None:
    node = federation.nodes["cleveland"]
    scores = node.predict(NAME)

    assert scores.version.startswith("personal-") and scores.version.endswith(SHIFTED)
    personal = _probabilities(node, federation.spec, moved)
    global_ = _probabilities(node, federation.spec, federation.hub.weights(federation.version))
    got = {p.patient_id: p.probability for p in scores.scored}
    assert got and got == pytest.approx({k: personal[k] for k in got})
    assert np.mean([abs(got[k] - global_[k]) for k in got]) > 0.05  # not the global model's
    method = scores.scored[0].assessment["method"]["coding"][0]  # type: ignore[index]
    assert method["code"] == scores.version and "personal model" in method["display"]
    assert _events(node, "predict")[-1].details["model"] == scores.version


def _probabilities(node: Node, spec: StudySpec, weights: dict[str, np.ndarray]) -> dict[str, Any]:
    from datetime import UTC, datetime

    scored = predict_cohort(node.store, spec, weights, "x" * 64, now=datetime.now(UTC))
    return {p.patient_id: p.probability for p in scored if p.probability is not None}


def test_the_node_cds_card_carries_the_personal_models_probability(
    federation: Federation, moved: dict[str, np.ndarray]
) -> None:
    node = federation.nodes["cleveland"]
    records = cleveland_records()
    access = FhirAccess(transport=httpx.MockTransport(Fhir(records)), timeout_s=2.0,
                        allowed_servers=(FHIR,))  # fmt: skip
    app = node_cds_app(node.store, node.hub, [NAME], node.audit, pseudonym_key=b"k" * 32,
                       jwt=None, fhir=access, allow_unauthenticated=True,
                       actor=node.name)  # fmt: skip
    with TestClient(app) as client:
        body = hook_request(prefetch=prefetch_for(records, PID))
        response = client.post(f"/cds-services/{SERVICE}", json=body)
        assert response.status_code == 200, response.text
        [card] = response.json()["cards"]
        url = card["source"]["url"]
        model_card = client.get(url.split("testserver", 1)[-1]).json()

    personal = _probabilities(node, federation.spec, moved)[PID]
    global_ = _probabilities(node, federation.spec, federation.hub.weights(federation.version))
    [shown] = _values(card, "probabilityDecimal")
    assert shown == round(personal, 4) and abs(shown - global_[PID]) > 0.1
    assert f"{round(personal * 100)}%" in card["summary"]
    assert "personal-" in card["source"]["label"]
    assert model_card["model_version"].endswith(SHIFTED)
    assert model_card["personal"]["derived_from"] == SHIFTED
    assert model_card["personal"]["method"] == "finetune"
    assert model_card["lineage"][0]["parent"] == SHIFTED


def _values(tree: Any, key: str) -> list[Any]:
    """Every value of `key` anywhere in a JSON tree."""
    if isinstance(tree, dict):
        here = [tree[key]] if key in tree else []
        return here + [v for item in tree.values() for v in _values(item, key)]
    if isinstance(tree, list):
        return [v for item in tree for v in _values(item, key)]
    return []


def test_a_personalizing_study_without_a_personal_model_is_not_served(
    federation: Federation, tmp_path: Path
) -> None:
    store = NodeStore.open(tmp_path / "store.sqlite", b"k" * 32)
    try:
        with (
            AuditLog.open(tmp_path / "audit.sqlite", Identity.generate()) as audit,
            pytest.raises(ConfigError, match="no personal model yet"),
        ):
            served_personal(store, federation.spec, audit=audit, actor="x", use="cds")
    finally:
        store.close()
    assert ModelLineage(federation.nodes["basel"].store.db).evaluation(NAME, federation.version)


class _Failing(FineTuning):
    def personalize(self, *args: Any, **kwargs: Any) -> Any:
        raise ValueError("no validation rows at this site")


def test_a_personalization_that_fails_is_audited_and_the_hub_still_gets_its_report(
    federation: Federation, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(registry, "PERSONALIZERS", {**registry.PERSONALIZERS, "finetune": _Failing})
    hub = federation.hub
    assert hub.post_round(NAME).status_code == 200
    _work(federation.nodes, "train")
    version = hub.client.get(f"/v1/studies/{NAME}", headers=hub.admin).json()["current_version"]
    _work(federation.nodes, "evaluate")

    sent = hub.client.get(f"/v1/models/{version}", headers=hub.admin).json()["metrics"]
    assert set(sent) == {"cleveland", "basel"}  # acknowledged, as without personalization
    for node in federation.nodes.values():
        assert PersonalModels(node.store.db).get(NAME, version) is None
        refused = _events(node, "personal.model")[-1]
        assert refused.outcome == "refused" and "no validation rows" in refused.details["reason"]
