"""Issue 9, what a node credential can make the hub do: study bounds on updates (item 2), which
nodes' feature statistics are pooled (item 1), what a node credential reads and reports
(item 10), and a linear study validation with a feature cap (item 16).

The hub runs in-process (`tests/hub_support.py`); updates are framed and signed like the node
worker does it.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from httpx import Response

from aipipe.models import build_model, weights_to_arrays
from aipipe.models.training import clip_update, train_local
from aipipe.study.spec import MAX_FEATURES, StudySpec
from tests.e2e_support import frame, sign, signed_update
from tests.hub_support import STUDY, Arrays, Hub, Node, Round, update

MAX_EXAMPLES = 500
UPDATE_NORM = 5.0
BOUNDED: dict[str, Any] = {
    **STUDY,
    "bounds": {"max_examples": MAX_EXAMPLES, "update_norm": UPDATE_NORM},
}


@pytest.fixture
def bounded_round(hub: Hub, pair: tuple[Node, Node]) -> Round:
    return hub.open_round(hub.publish(BOUNDED))


def _study_head(hub: Hub, study: str) -> str:
    info: dict[str, Any] = hub.client.get(f"/v1/studies/{study}", headers=hub.admin).json()
    return str(info["current_version"])


def _refusals(hub: Hub, action: str, node: str) -> list[str]:
    return [str(e.details.get("reason")) for e in hub.events(action) if e.actor == node]


def _small(at: Round) -> Arrays:
    return {k: np.full_like(v, 0.01) for k, v in at.base.items()}


# -- item 2: bounds on a plaintext update -----------------------------------------------------


def _claiming(node: Node, at: Round, delta: Arrays, n: int) -> bytes:
    """A signed update whose header claims `n` examples, past what the wire model would build."""
    header, payload = signed_update(
        node.identity, node=node.name, study=at.study, study_digest=at.digest,
        round=at.number, base_version=at.base_version, delta=delta,
    )  # fmt: skip
    return frame(sign(node.identity, header.model_copy(update={"num_examples": n})), payload)


@pytest.mark.parametrize(
    ("n", "reason"), [(10**6, "max_examples=500"), (10**12, "num_examples")], ids=["1e6", "1e12"]
)
def test_an_update_claiming_too_many_examples_is_refused_audited_and_moves_no_model(
    hub: Hub, pair: tuple[Node, Node], bounded_round: Round, n: int, reason: str
) -> None:
    alpha, beta = pair
    head = _study_head(hub, bounded_round.study)
    target = {k: v + 1.0 for k, v in bounded_round.base.items()}  # ‖Δ‖ = √3 < update_norm
    steer = {k: target[k] - bounded_round.base[k] for k in target}

    refused = hub.upload(alpha, bounded_round, _claiming(alpha, bounded_round, steer, n))
    accepted = hub.upload(beta, bounded_round, update(beta, bounded_round, _small(bounded_round)))

    assert refused.status_code == 409
    assert reason in refused.json()["detail"]
    assert len(hub.events("update.refused")) == 1
    assert [e.actor for e in hub.events("update.refused")] == ["alpha"]
    assert accepted.status_code == 200
    assert hub.round(bounded_round)["reported"] == ["beta"]
    assert _study_head(hub, bounded_round.study) == head


def test_an_update_of_1e30_per_weight_is_refused_audited_and_moves_no_model(
    hub: Hub, pair: tuple[Node, Node], bounded_round: Round
) -> None:
    alpha, _ = pair
    head = _study_head(hub, bounded_round.study)
    huge = {k: np.full_like(v, 1e30) for k, v in bounded_round.base.items()}

    with np.errstate(over="ignore"):  # the helper's float32 norm overflows; stated below
        header, payload = signed_update(
            alpha.identity,
            node="alpha",
            study=bounded_round.study,
            study_digest=bounded_round.digest,
            round=bounded_round.number,
            base_version=bounded_round.base_version,
            delta=huge,
            signed=False,
        )
    norm = np.sqrt(sum(np.square(v, dtype=np.float64).sum() for v in huge.values()))
    header = sign(alpha.identity, header.model_copy(update={"update_norm": float(norm)}))

    response = hub.upload(alpha, bounded_round, frame(header, payload))

    assert response.status_code == 409
    assert "update_norm=5" in response.json()["detail"]
    assert any("update_norm" in r for r in _refusals(hub, "update.refused", "alpha"))
    assert hub.round(bounded_round)["reported"] == []
    assert _study_head(hub, bounded_round.study) == head


def test_an_honest_round_at_the_bounds_closes_with_the_fedavg_model(
    hub: Hub, pair: tuple[Node, Node], bounded_round: Round
) -> None:
    size = sum(v.size for v in bounded_round.base.values())
    edge = {  # ‖Δ‖ just under update_norm, n = max_examples
        k: np.full_like(v, 0.999 * UPDATE_NORM / np.sqrt(size))
        for k, v in bounded_round.base.items()
    }
    for node in pair:
        response = hub.upload(
            node, bounded_round, update(node, bounded_round, edge, n=MAX_EXAMPLES)
        )
        assert response.status_code == 200, response.text

    info = hub.round(bounded_round)
    weights = hub.weights(info["result_version"])

    assert info["state"] == "closed"
    for key, base in bounded_round.base.items():
        np.testing.assert_allclose(weights[key], base + edge[key], rtol=1e-6)


def test_a_study_states_its_bounds_and_older_files_set_them_under_secure_options() -> None:
    legacy = StudySpec.model_validate(
        {**STUDY, "secure_options": {"update_clip": 3.0, "max_examples": 70}}
    )
    default = StudySpec.model_validate(STUDY)

    assert (legacy.bounds.update_norm, legacy.bounds.max_examples) == (3.0, 70)
    assert (default.bounds.update_norm, default.bounds.max_examples) == (10.0, 1000)


def test_bounds_must_be_finite() -> None:
    with pytest.raises(ValueError, match="finite"):
        StudySpec.model_validate({**STUDY, "bounds": {"update_norm": float("inf")}})


def test_the_node_clips_its_update_to_the_studys_update_norm() -> None:
    spec = StudySpec.model_validate(
        {**STUDY, "bounds": {"update_norm": 0.01}, "training": {"lr": 1.0, "local_steps": 20}}
    )
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(40, 2)), (rng.random(40) > 0.5).astype(np.float64)
    model = build_model(spec.model, 2, seed=0)
    start = weights_to_arrays(model)
    raw = train_local(
        model, x, y, training=spec.training, privacy=spec.privacy, noise_multiplier=1.0, seed=1
    )

    clipped = clip_update(raw, spec.bounds.update_norm)
    norm = np.sqrt(sum(np.square(v, dtype=np.float64).sum() for v in clipped.delta.values()))

    assert raw.update_norm > spec.bounds.update_norm
    assert norm <= spec.bounds.update_norm
    assert clipped.update_norm == pytest.approx(norm)
    for key in start:  # the weights the node keeps are the ones it announced
        np.testing.assert_allclose(clipped.weights[key], start[key] + clipped.delta[key], atol=1e-6)


# -- item 1: whose feature statistics the hub pools --------------------------------------------


# Statistics leave a node only noised, for a study whose features have ranges (issue 10).
RANGED: dict[str, Any] = {
    **BOUNDED,
    "features": [{**f, "range": [0, 700]} for f in BOUNDED["features"]],
}


def _stats(study: dict[str, Any], *, n: float = 40.0, sum_: float = 50.0, sq: float = 5.0) -> str:
    return json.dumps(
        {"study_digest": study["digest"], "n": n, "sums": [sum_, sum_], "squares": [sq, sq]}
    )


def _post_stats(hub: Hub, node: Node, study: dict[str, Any], body: str) -> Response:
    response: Response = hub.client.post(
        f"/v1/studies/{study['name']}/stats",
        content=body,
        headers={**node.headers, "Content-Type": "application/json"},
    )
    return response


def _pooled_sites(hub: Hub, study: str) -> int:
    store = hub.paths.open_store()
    try:
        digest = store.study(study)["digest"]
        return len(store.feature_stats(study, digest))
    finally:
        store.close()


def test_statistics_from_a_node_never_selected_for_the_study_are_refused_and_audited(
    hub: Hub, pair: tuple[Node, Node]
) -> None:
    study = hub.publish(RANGED)
    hub.open_round(study)
    late = hub.enrol("gamma")  # enrolled after the round opened: never selected

    response = _post_stats(hub, late, study, _stats(study, n=400.0))

    assert response.status_code == 403
    assert _refusals(hub, "stats.refused", "gamma")
    assert _pooled_sites(hub, study["name"]) == 0


def test_statistics_from_an_excluded_node_are_refused(hub: Hub, pair: tuple[Node, Node]) -> None:
    alpha, _ = pair
    study = hub.publish(RANGED)
    at = hub.open_round(study)
    hub.client.post(
        f"{at.path}/decline", json={"reason": "budget", "exclude": True}, headers=alpha.headers
    )

    response = _post_stats(hub, alpha, study, _stats(study))

    assert response.status_code == 403
    assert _pooled_sites(hub, study["name"]) == 0


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (lambda s: _stats(s, n=10**9), "max_examples=500"),
        (lambda s: _stats(s).replace("50.0", "NaN", 1), "NaN or infinite value in sums"),
        (lambda s: _stats(s).replace("5.0", "1e999", 1), "NaN or infinite value in squares"),
    ],
    ids=["n-1e9", "nan-sum", "infinite-square"],
)
def test_statistics_outside_the_bounds_or_not_finite_are_refused_and_audited(
    hub: Hub, pair: tuple[Node, Node], body: Any, why: str
) -> None:
    alpha, _ = pair
    study = hub.publish(RANGED)
    hub.open_round(study)

    response = _post_stats(hub, alpha, study, body(study))

    assert response.status_code == 409
    assert why in response.json()["detail"]
    assert any(why in r for r in _refusals(hub, "stats.refused", "alpha"))
    assert _pooled_sites(hub, study["name"]) == 0


def test_statistics_of_a_selected_node_within_the_bounds_are_pooled(
    hub: Hub, pair: tuple[Node, Node]
) -> None:
    study = hub.publish(RANGED)
    hub.open_round(study)

    for node in pair:
        assert _post_stats(hub, node, study, _stats(study, n=MAX_EXAMPLES)).status_code == 200

    assert _pooled_sites(hub, study["name"]) == 2


# -- item 10: what a node credential reads and reports -----------------------------------------


@pytest.fixture
def trained(hub: Hub, pair: tuple[Node, Node]) -> tuple[Round, str]:
    """A closed round of study 'hub-test' with alpha and beta, both evaluated."""
    at = hub.open_round(hub.publish())
    for node in pair:
        assert hub.upload(node, at, update(node, at, _small(at), n=20)).status_code == 200
    version = hub.round(at)["result_version"]
    for node, n_test in zip(pair, (11, 13), strict=True):
        report = {"version": version, "n": n_test, "accuracy": 0.5, "auc": None, "loss": 0.7}
        response = hub.client.post(
            f"/v1/models/{version}/metrics", json=report, headers=node.headers
        )
        assert response.status_code == 200, response.text
    return at, version


def _other_study_node(hub: Hub) -> Node:
    """gamma: enrolled after 'hub-test' ran, and taking part in study 'other' only."""
    gamma = hub.enrol("gamma")
    hub.open_round(hub.publish({**STUDY, "name": "other"}))
    return gamma


def _excluded_node(hub: Hub, pair: tuple[Node, Node]) -> Node:
    """alpha, after it declined a second round of 'hub-test' and asked to be excluded."""
    alpha, _ = pair
    at = hub.open_round(hub.client.get("/v1/studies/hub-test", headers=hub.admin).json())
    decline = {"reason": "budget exhausted", "exclude": True}
    assert hub.client.post(f"{at.path}/decline", json=decline, headers=alpha.headers).is_success
    return alpha


@pytest.mark.parametrize("who", ["other-study", "excluded"])
def test_a_node_outside_a_study_reads_none_of_its_rounds_or_models(
    hub: Hub, pair: tuple[Node, Node], trained: tuple[Round, str], who: str
) -> None:
    at, version = trained
    node = _other_study_node(hub) if who == "other-study" else _excluded_node(hub, pair)

    paths = [
        "/v1/studies/hub-test/rounds",
        at.path,
        f"/v1/models/{version}",
        f"/v1/models/{version}/weights",
    ]
    statuses = {path: hub.client.get(path, headers=node.headers).status_code for path in paths}
    listed = hub.client.get("/v1/models", headers=node.headers).json()

    assert statuses == dict.fromkeys(paths, 403)
    assert all(m["study"] != "hub-test" for m in listed)


def test_an_excluded_node_cannot_read_the_study_nor_post_metrics_for_it(
    hub: Hub, pair: tuple[Node, Node], trained: tuple[Round, str]
) -> None:
    _, version = trained
    alpha = _excluded_node(hub, pair)
    report = {"version": version, "n": 1, "accuracy": 1.0, "auc": None, "loss": 0.0}

    study = hub.client.get("/v1/studies/hub-test", headers=alpha.headers)
    posted = hub.client.post(f"/v1/models/{version}/metrics", json=report, headers=alpha.headers)
    work = hub.client.get("/v1/work", headers=alpha.headers).json()

    assert (study.status_code, posted.status_code) == (403, 403)
    assert work["kind"] == "idle"
    assert _refusals(hub, "metrics.refused", "alpha")


def test_a_node_of_another_study_cannot_post_metrics_for_it(
    hub: Hub, pair: tuple[Node, Node], trained: tuple[Round, str]
) -> None:
    _, version = trained
    gamma = _other_study_node(hub)
    report = {"version": version, "n": 1, "accuracy": 1.0, "auc": None, "loss": 0.0}

    posted = hub.client.post(f"/v1/models/{version}/metrics", json=report, headers=gamma.headers)
    shown = hub.client.get(f"/v1/models/{version}", headers=hub.admin).json()["metrics"]

    assert posted.status_code == 403
    assert sorted(shown) == ["alpha", "beta"]


def test_a_node_posts_no_metrics_for_the_untrained_initial_model(
    hub: Hub, pair: tuple[Node, Node]
) -> None:
    alpha, _ = pair
    study = hub.publish()
    hub.open_round(study)
    initial = study["current_version"]
    report = {"version": initial, "n": 1, "accuracy": 1.0, "auc": None, "loss": 0.0}

    posted = hub.client.post(f"/v1/models/{initial}/metrics", json=report, headers=alpha.headers)

    assert posted.status_code == 403


def test_a_node_sees_only_its_own_n_epsilon_and_metrics_the_admin_sees_all(
    hub: Hub, pair: tuple[Node, Node], trained: tuple[Round, str]
) -> None:
    at, version = trained
    alpha, _ = pair

    as_node = hub.client.get(f"/v1/models/{version}", headers=alpha.headers).json()
    round_as_node = hub.client.get(at.path, headers=alpha.headers).json()
    as_admin = hub.client.get(f"/v1/models/{version}", headers=hub.admin).json()

    by_node = {c["node"]: c for c in as_node["contributors"]}
    assert by_node["beta"] == {"node": "beta"}
    assert by_node["alpha"]["n"] == 20
    assert sorted(as_node["metrics"]) == ["alpha"]
    assert sorted(round_as_node["metrics"]) == ["alpha"]
    assert round_as_node["metrics"]["alpha"]["n"] == 11
    assert {c["node"]: c["n"] for c in as_admin["contributors"]} == {"alpha": 20, "beta": 20}
    assert sorted(as_admin["metrics"]) == ["alpha", "beta"]


def test_a_selected_node_reads_its_study_round_and_base_weights(
    hub: Hub, pair: tuple[Node, Node]
) -> None:
    alpha, _ = pair
    study = hub.publish()
    spec_before_any_round = hub.client.get("/v1/studies/hub-test", headers=alpha.headers)
    at = hub.open_round(study)

    paths = ["/v1/studies/hub-test", at.path, f"/v1/models/{at.base_version}/weights"]
    statuses = [hub.client.get(path, headers=alpha.headers).status_code for path in paths]

    assert spec_before_any_round.status_code == 200  # read to approve it
    assert statuses == [200, 200, 200]


# -- item 16: study validation ------------------------------------------------------------------


def _features(count: int) -> list[dict[str, Any]]:
    return [{"name": f"f{i}", "concept": "cholesterol"} for i in range(count)]


def test_a_study_of_5000_aliased_features_validates() -> None:
    spec = StudySpec.model_validate({**STUDY, "features": _features(5000)})

    assert len(spec.columns()) == 5000


def test_a_study_over_the_feature_cap_is_refused_with_the_count_and_the_cap() -> None:
    with pytest.raises(ValueError, match=f"lists {MAX_FEATURES + 1} features; at most"):
        StudySpec.model_validate({**STUDY, "features": _features(MAX_FEATURES + 1)})


def test_a_study_over_the_feature_cap_is_refused_at_publish(hub: Hub) -> None:
    spec = {**STUDY, "features": _features(MAX_FEATURES + 1)}

    response = hub.client.post("/v1/studies", json={"spec": spec}, headers=hub.admin)

    assert response.status_code == 422
    assert f"at most {MAX_FEATURES}" in response.json()["detail"]


def test_duplicate_feature_names_are_named_once_each() -> None:
    features = _features(3) + _features(3)

    with pytest.raises(ValueError, match="repeated: f0, f1, f2"):
        StudySpec.model_validate({**STUDY, "features": features})
