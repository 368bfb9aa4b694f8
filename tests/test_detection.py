"""Detection and reputation (issue 14): a study's `detection:` block makes the hub score every
update of a plaintext round against the round's coordinate-wise median, flag the outliers,
audit them with their numbers, leave them out when the study says so, and keep a per-node
reputation that keeps a repeat offender out of rounds until an admin readmits it.

Rounds run through the in-process hub over HTTP with updates signed by real node keys; the
"malicious" node sends an honest-looking update scaled ×10 (model replacement), within the
study's `update_norm`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aipipe.aggregation import aggregator_for
from aipipe.aggregation.anomaly import robust_reference, update_scores
from aipipe.audit.log import AuditLog
from aipipe.cli import model as model_cli
from aipipe.errors import StudyError
from aipipe.hub.detection import robust_z, score_updates
from aipipe.hub.home import HubPaths
from aipipe.hub.hub import Hub as HubHome
from aipipe.hub.service import HubService
from aipipe.node.client import HubClient
from aipipe.secure.identity import Identity
from aipipe.study.spec import StudySpec, parse_study
from tests.cli_support import invoke
from tests.hub_support import STUDY, Arrays, Hub, Node, Round, running_hub, update

HONEST = ("alpha", "bravo", "charlie", "delta")
ATTACKER = "mallory"
SCALE = 10.0
N = {"alpha": 40, "bravo": 30, "charlie": 50, "delta": 20, ATTACKER: 30}


def detection_study(name: str = "screened", **detection: Any) -> dict[str, Any]:
    return {**STUDY, "name": name, "min_nodes": 3, "detection": detection}


def honest_delta(base: Arrays, seed: int) -> Arrays:
    """A plausible local update: one shared direction plus a site's own noise."""
    rng = np.random.default_rng(seed)
    return {
        k: (0.02 + 0.004 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in base.items()
    }


def deltas_for(at: Round) -> dict[str, Arrays]:
    honest = {name: honest_delta(at.base, 100 * at.number + i) for i, name in enumerate(HONEST)}
    scaled = {k: SCALE * v for k, v in honest_delta(at.base, 999 + at.number).items()}
    return {**honest, ATTACKER: scaled}


def expected(at: Round, deltas: dict[str, Arrays], names: list[str]) -> Arrays:
    """The study's aggregator over `names`' updates only, from the round's base."""
    aggregator = aggregator_for(at.spec.aggregation, at.spec.training.proximal_mu)
    aggregator.begin(at.base)
    for name in names:
        aggregator.accumulate(deltas[name], N[name])
    return aggregator.finalize()


def run_round(
    hub: Hub, study: dict[str, Any], nodes: dict[str, Node]
) -> tuple[Round, dict[str, Arrays]]:
    """Open a round and have every selected node upload its update; the round and the deltas."""
    at = hub.open_round(study)
    deltas = deltas_for(at)
    for name in hub.round(at)["selected"]:
        response = hub.upload(nodes[name], at, update(nodes[name], at, deltas[name], n=N[name]))
        assert response.status_code == 200, response.text
    return at, deltas


@contextmanager
def federation(
    tmp_path: Path, study: dict[str, Any]
) -> Iterator[tuple[Hub, dict[str, Node], dict[str, Any]]]:
    with running_hub(tmp_path / "hub") as hub:
        nodes = {name: hub.enrol(name) for name in (*HONEST, ATTACKER)}
        yield hub, nodes, hub.publish(study)


def flagged_events(hub: Hub) -> list[dict[str, Any]]:
    return [dict(e.details) for e in hub.events("update.flagged")]


# -- the pure scoring -----------------------------------------------------------------------------


def deltas_of(vectors: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
    return [{"w": v} for v in vectors]


def flags(vectors: list[np.ndarray], threshold: float = 3.5) -> list[bool]:
    return [s.flagged for s in score_updates(deltas_of(vectors), threshold)]


def test_the_geometry_is_the_aggregation_anomaly_modules() -> None:
    vectors = [np.array([1.0, 10.0]), np.array([2.0, -5.0]), np.array([100.0, 0.0])]
    scores = score_updates(deltas_of(vectors), threshold=3.5)
    want = update_scores(deltas_of(vectors), robust_reference(deltas_of(vectors)))
    assert [(s.distance, s.norm, s.cosine) for s in scores] == [tuple(w) for w in want]
    assert robust_reference(deltas_of(vectors))["w"].tolist() == [2.0, 0.0]


def test_the_robust_z_score_is_the_deviation_over_1_4826_mad() -> None:
    # median 3, |x − 3| = 2 1 0 1 97 → MAD 1
    z = robust_z([1.0, 2.0, 3.0, 4.0, 100.0])
    assert z == pytest.approx([-2 / 1.4826, -1 / 1.4826, 0.0, 1 / 1.4826, 97 / 1.4826])


def test_a_lone_outlier_among_equal_updates_is_flagged_and_equal_ones_never_are() -> None:
    same = [np.array([0.1, 0.1])] * 4
    assert flags([*same, np.array([1.0, 1.0])]) == [False] * 4 + [True]  # MAD 0: mean |x − med|
    assert not any(flags(same))


def test_honest_updates_a_few_percent_apart_are_not_flagged_however_small_their_mad() -> None:
    # three real DP updates of an e2e round (norms 0.1117, 0.1041, 0.1027): MAD 0.0014 made the
    # longest one a 3.8 z-score outlier, 9 % longer than the others
    rng = np.random.default_rng(3)
    direction = rng.standard_normal(14)
    direction /= np.linalg.norm(direction)
    vectors = [
        norm * direction + 0.004 * rng.standard_normal(14) for norm in (0.1117, 0.1041, 0.1027)
    ]
    assert not any(flags(vectors))
    assert flags([*vectors, 10 * vectors[0]]) == [False, False, False, True]


def test_a_small_sites_long_honest_update_is_not_flagged_but_a_scaled_one_is() -> None:
    # Fed-Heart-Disease in 12 sites: a 10-row Swiss site's honest update reaches 1.9 × the
    # round's median norm while the others sit within ±30 %: the MAD (0.15) alone scored it 4
    rng = np.random.default_rng(5)
    direction = np.ones(14) / np.sqrt(14)
    norms = (0.7, 0.8, 0.9, 1.0, 1.0, 1.1, 1.2, 1.9)
    vectors = [n * direction + 0.02 * rng.standard_normal(14) for n in norms]
    assert not any(flags(vectors))
    assert flags([*vectors, 10 * vectors[3]]) == [False] * 8 + [True]


def test_a_sign_flipped_update_is_far_from_the_reference_and_points_away() -> None:
    rng = np.random.default_rng(0)
    honest = [0.02 + 0.004 * rng.standard_normal(50) for _ in range(4)]
    scores = score_updates(deltas_of([*honest, -honest[0]]), threshold=3.5)
    assert [s.flagged for s in scores] == [False] * 4 + [True]
    assert scores[-1].cosine < -0.9 < 0.9 < min(s.cosine for s in scores[:4])


def aligned_sites(rng: np.random.Generator) -> list[np.ndarray]:
    """Five honest sites that agree on the direction but not on the step: norms 0.4 to 1.6."""
    direction = np.ones(20) / np.sqrt(20)
    return [n * direction + 0.01 * rng.standard_normal(20) for n in (0.4, 0.7, 1.0, 1.3, 1.6)]


def test_a_short_sign_flipped_update_is_flagged_by_its_direction_alone() -> None:
    # −0.3 × the median site: its distance (1.3) and norm (0.3) are ordinary among sites whose
    # steps differ this much, but it points against every one of them
    honest = aligned_sites(np.random.default_rng(1))
    flipped = -0.3 * honest[2]
    scores = score_updates(deltas_of([*honest, flipped]), threshold=3.5)
    assert [s.flagged for s in scores] == [False] * 5 + [True]
    attacker = scores[-1]
    assert attacker.z_distance < 3.5 and attacker.z_norm < 3.5 < attacker.z_direction
    assert attacker.cosine < -0.99


def test_an_ipm_update_against_agreeing_sites_is_flagged() -> None:
    # inner-product manipulation (Xie et al. 2020): −ε · the mean of the honest updates, ε = 0.5
    honest = aligned_sites(np.random.default_rng(2))
    ipm = -0.5 * np.mean(honest, axis=0)
    assert flags([*honest, ipm]) == [False] * 5 + [True]


def test_heterogeneous_honest_sites_are_not_flagged_for_their_direction() -> None:
    # non-IID sites (cosines to the median from about −0.6 to +1, as on Fed-Heart-Disease):
    # directions spread this widely are no outliers, though a "cosine < 0" floor flags two
    angles = np.radians([-120.0, -60.0, -25.0, 0.0, 20.0, 50.0, 80.0, 125.0])
    vectors = [np.array([np.cos(a), np.sin(a)]) for a in angles]
    scores = score_updates(deltas_of(vectors), threshold=3.5)
    assert sum(s.cosine < 0 for s in scores) >= 2
    assert not any(s.flagged for s in scores)
    assert max(s.z_direction for s in scores) < 3.5


def test_noise_of_an_ordinary_norm_is_flagged_by_its_distance_among_consistent_sites() -> None:
    # a Gaussian update scaled to the median site's norm, among sites that agree in direction
    # and step: its norm is ordinary, its direction (cosine ≈ 0) is no opposite, its distance
    # to the median gives it away
    rng = np.random.default_rng(4)
    direction = np.ones(20) / np.sqrt(20)
    honest = [n * direction + 0.01 * rng.standard_normal(20) for n in (0.9, 0.95, 1.0, 1.05, 1.1)]
    noise = rng.standard_normal(20)
    noise *= np.linalg.norm(honest[2]) / np.linalg.norm(noise)
    scores = score_updates(deltas_of([*honest, noise]), threshold=3.5)
    assert [s.flagged for s in scores] == [False] * 5 + [True]
    assert abs(scores[-1].cosine) < 0.6 and scores[-1].z_norm < 3.5 < scores[-1].z_distance


# -- a round with one scaled update ---------------------------------------------------------------


def test_a_scaled_update_is_flagged_audited_with_its_numbers_and_left_out(tmp_path: Path) -> None:
    with federation(tmp_path, detection_study(exclude=True)) as (hub, nodes, study):
        at, deltas = run_round(hub, study, nodes)
        info = hub.round(at)
        assert info["state"] == "closed", info
        new = hub.weights(info["result_version"])
        want = expected(at, deltas, list(HONEST))
        assert all(np.allclose(new[k], want[k], atol=1e-6) for k in want)

        (event,) = flagged_events(hub)
        assert event["node"] == ATTACKER and event["round"] == at.number
        assert event["excluded"] is True and event["threshold"] == 3.5
        assert event["z_distance"] > 3.5 or event["z_norm"] > 3.5
        norm = float(
            np.sqrt(sum(np.square(v, dtype=np.float64).sum() for v in deltas[ATTACKER].values()))
        )
        assert event["norm"] == pytest.approx(norm, rel=1e-5)
        assert event["distance"] > 0 and -1 <= event["cosine"] <= 1
        assert event["reputation"] == 0.5  # 0.5 · 1 + 0.5 · 0

        model = hub.client.get(f"/v1/models/{info['result_version']}", headers=hub.admin).json()
        assert sorted(c["node"] for c in model["contributors"]) == sorted(HONEST)
        assert all(c["flagged"] is False and "z_norm" in c for c in model["contributors"])
        (left_out,) = model["excluded"]
        assert left_out["node"] == ATTACKER and left_out["flagged"] is True


def test_without_exclude_the_scaled_update_is_kept_but_flagged(tmp_path: Path) -> None:
    with federation(tmp_path, detection_study(exclude=False)) as (hub, nodes, study):
        at, deltas = run_round(hub, study, nodes)
        info = hub.round(at)
        new = hub.weights(info["result_version"])
        want = expected(at, deltas, [*HONEST, ATTACKER])
        assert all(np.allclose(new[k], want[k], atol=1e-6) for k in want)
        (event,) = flagged_events(hub)
        assert event["node"] == ATTACKER and event["excluded"] is False
        model = hub.client.get(f"/v1/models/{info['result_version']}", headers=hub.admin).json()
        flags = {c["node"]: c["flagged"] for c in model["contributors"]}
        assert flags == {**dict.fromkeys(HONEST, False), ATTACKER: True}
        assert model["excluded"] == []


def test_a_round_whose_every_update_is_flagged_keeps_them_all_and_says_so(
    tmp_path: Path,
) -> None:
    # [head.bias, head.weight] of four nodes, each past a tiny threshold in distance or norm (with
    # an odd count the median update is never flagged; with four, two by each score can be)
    vectors = [[1.0, 2.0, 2.0], [-2.0, 3.0, -2.0], [-3.0, 2.0, -1.0], [0.0, -2.0, 1.0]]
    with federation(tmp_path, detection_study(threshold=0.01, exclude=True)) as (hub, nodes, study):
        at = hub.open_round(study)
        deltas: dict[str, Arrays] = {}
        for name, (b, w0, w1) in zip(HONEST, vectors, strict=True):
            deltas[name] = {
                "head.bias": np.array([b], dtype=np.float32),
                "head.weight": np.array([[w0, w1]], dtype=np.float32),
            }
            hub.upload(nodes[name], at, update(nodes[name], at, deltas[name], n=N[name]))
        declined = hub.client.post(
            f"{at.path}/decline",
            json={"reason": "sits this one out"},
            headers=nodes[ATTACKER].headers,
        )
        assert declined.status_code == 200, declined.text
        info = hub.round(at)
        assert info["state"] == "closed", info
        events = flagged_events(hub)
        assert sorted(e["node"] for e in events) == sorted(HONEST)
        assert all(e["excluded"] is False for e in events)
        assert all("every update was flagged" in e["kept_because"] for e in events)
        want = expected(at, deltas, list(HONEST))
        new = hub.weights(info["result_version"])
        assert all(np.allclose(new[k], want[k], atol=1e-6) for k in want)


def test_a_study_without_detection_flags_nothing(tmp_path: Path) -> None:
    plain = {**STUDY, "name": "unscreened", "min_nodes": 3}
    with federation(tmp_path, plain) as (hub, nodes, study):
        at, deltas = run_round(hub, study, nodes)
        info = hub.round(at)
        want = expected(at, deltas, [*HONEST, ATTACKER])
        new = hub.weights(info["result_version"])
        assert all(np.allclose(new[k], want[k], atol=1e-6) for k in want)
        assert flagged_events(hub) == []


# -- reputation -----------------------------------------------------------------------------------


def test_a_node_under_the_floor_is_not_selected_until_readmitted(tmp_path: Path) -> None:
    study_raw = detection_study(reputation_decay=0.5, reputation_floor=0.6)
    with federation(tmp_path, study_raw) as (hub, nodes, study):
        run_round(hub, study, nodes)
        listed = hub.client.get("/v1/nodes", headers=hub.admin).json()
        assert {n["name"]: n["reputation"] for n in listed}[ATTACKER] == 0.5
        second = hub.open_round(study)
        assert hub.round(second)["selected"] == sorted(HONEST)
        (excluded,) = [dict(e.details) for e in hub.events("node.excluded")]
        assert excluded == {
            "study": "screened",
            "reputation": 0.5,
            "floor": 0.6,
            "until": "an admin runs `aipipe hub readmit`",
        }
        deltas = deltas_for(second)
        for name in HONEST:
            hub.upload(nodes[name], second, update(nodes[name], second, deltas[name], n=N[name]))
        assert hub.round(second)["state"] == "closed"

        with HubHome(hub.paths) as home:
            assert home.readmit(ATTACKER) == 0.5
            reputations = {n["name"]: n["reputation"] for n in home.nodes()}
        assert reputations == {**dict.fromkeys(HONEST, 1.0), ATTACKER: 1.0}
        (readmitted,) = hub.events("node.readmitted")
        assert readmitted.actor == "admin" and readmitted.resource == f"node/{ATTACKER}"
        assert dict(readmitted.details) == {"previous": 0.5, "reputation": 1.0}
        third = hub.open_round(study)
        assert ATTACKER in hub.round(third)["selected"]


def test_reputation_falls_with_each_flag_and_stays_full_for_clean_nodes(tmp_path: Path) -> None:
    study_raw = detection_study(reputation_decay=0.5, reputation_floor=0.1)
    with federation(tmp_path, study_raw) as (hub, nodes, study):
        run_round(hub, study, nodes)
        run_round(hub, study, nodes)
        with HubHome(hub.paths) as home:
            rows = {n["name"]: n for n in home.nodes()}
        assert rows[ATTACKER]["reputation"] == pytest.approx(0.25)
        assert rows[ATTACKER]["flags"] == 2 and rows[ATTACKER]["screened"] == 2
        assert rows["alpha"]["reputation"] == 1.0 and rows["alpha"]["flags"] == 0


def test_finishing_a_round_again_after_a_restart_moves_no_reputation_twice(
    tmp_path: Path,
) -> None:
    with federation(tmp_path, detection_study()) as (hub, nodes, study):
        at, _ = run_round(hub, study, nodes)
        paths = hub.paths
    with service_of(paths) as service:
        spec = service.spec("screened")
        protocol = service.protocols.for_spec(spec)
        again = protocol.finish(spec, at.number)
        assert again is not None and ATTACKER in {c["node"] for c in again.excluded}
        assert service.store.reputation(ATTACKER) == 0.5
    with AuditLog.open(paths.audit_log, None) as log:
        assert sum(e.action == "update.flagged" for e in log.events()) == 1


@contextmanager
def service_of(paths: HubPaths) -> Iterator[HubService]:
    identity = Identity.load(paths.identity_key)
    store = paths.open_store()
    audit = AuditLog.open(paths.audit_log, identity)
    try:
        yield HubService(paths, store, audit, identity)
    finally:
        audit.close()
        store.close()


# -- the study block ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["secagg", "ckks"])
def test_a_secure_study_with_detection_is_refused(mode: str) -> None:
    raw = {**detection_study(), "secure": mode}
    with pytest.raises(StudyError, match="screens each update on its own"):
        parse_study(json.dumps(raw))


def test_the_hub_refuses_to_publish_a_secure_study_with_detection(tmp_path: Path) -> None:
    with running_hub(tmp_path / "hub") as hub:
        raw = {**detection_study(), "secure": "secagg"}
        response = hub.client.post("/v1/studies", json={"spec": raw}, headers=hub.admin)
        assert response.status_code == 422, response.text
        assert "secure: secagg hides from the hub" in response.json()["detail"]


def test_the_block_changes_the_digest_and_its_absence_does_not() -> None:
    without = StudySpec.model_validate(STUDY)
    assert StudySpec.model_validate({**STUDY, "detection": None}).digest() == without.digest()
    assert StudySpec.model_validate({**STUDY, "detection": {}}).digest() != without.digest()


def test_the_block_takes_documented_defaults_and_refuses_nonsense_settings() -> None:
    block = parse_study(json.dumps(detection_study())).detection
    assert block is not None
    assert (block.threshold, block.exclude) == (3.5, True)
    assert (block.reputation_decay, block.reputation_floor) == (0.5, 0.5)
    bad_settings: list[dict[str, Any]] = [
        {"threshold": 0},
        {"reputation_decay": 1},
        {"reputation_floor": 2},
        {"x": 1},
    ]
    for bad in bad_settings:
        with pytest.raises(StudyError):
            parse_study(json.dumps(detection_study(**bad)))


# -- the command line -----------------------------------------------------------------------------


def test_hub_nodes_shows_reputation_and_readmit_restores_it(tmp_path: Path) -> None:
    study_raw = detection_study(reputation_floor=0.6)
    with federation(tmp_path, study_raw) as (hub, nodes, study):
        run_round(hub, study, nodes)
        home = hub.paths.home
    listed = invoke("hub", "nodes", "--home", home, "--json")
    assert listed.exit_code == 0, listed.output
    rows = {n["name"]: n for n in json.loads(listed.stdout)}
    assert rows[ATTACKER]["reputation"] == 0.5 and rows[ATTACKER]["flags"] == 1
    table = invoke("hub", "nodes", "--home", home)
    assert "reputation" in table.stdout and "0.5" in table.stdout

    done = invoke("hub", "readmit", "--home", home, "--node", ATTACKER, "--json")
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout) == {"node": ATTACKER, "previous": 0.5, "reputation": 1.0}
    rows = {
        n["name"]: n for n in json.loads(invoke("hub", "nodes", "--home", home, "--json").stdout)
    }
    assert rows[ATTACKER]["reputation"] == 1.0

    unknown = invoke("hub", "readmit", "--home", home, "--node", "nobody")
    assert unknown.exit_code != 0 and "no node 'nobody'" in unknown.stderr


def test_model_show_lists_each_contributors_scores_and_the_update_left_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with federation(tmp_path, detection_study()) as (hub, nodes, study):
        at, _ = run_round(hub, study, nodes)
        version = hub.round(at)["result_version"]

        def client(url: str, token: str) -> HubClient:
            return HubClient(url, token=token, transport=hub.client._transport)

        monkeypatch.setattr(model_cli, "client", client)
        args = ("--hub", "http://testserver", "--token", hub.admin_token)
        shown = invoke("model", "show", version[:12], *args)
        assert shown.exit_code == 0, shown.output
        assert "screening (detection)" in shown.stdout
        assert "z dir" in shown.stdout  # each score the rule reads has its column
        rows = {line.split()[1]: line.split() for line in shown.stdout.splitlines() if "│" in line}
        assert rows[ATTACKER][-6:] == ["yes", "│", "yes", "│", "0.5", "│"]  # flag, out, rep
        assert rows["alpha"][-6:] == ["no", "│", "no", "│", "1", "│"]
        as_json = json.loads(invoke("model", "show", version[:12], "--json", *args).stdout)
        assert as_json["excluded"][0]["node"] == ATTACKER

        # a node sees its own scores only, as it sees only its own n and ε
        path = f"/v1/models/{version}"
        own = hub.client.get(path, headers=nodes[ATTACKER].headers).json()
        assert [e["node"] for e in own["excluded"]] == [ATTACKER]
        other = hub.client.get(path, headers=nodes["alpha"].headers).json()
        assert other["excluded"] == []
        assert {c["node"]: set(c) for c in other["contributors"]}["bravo"] == {"node"}
