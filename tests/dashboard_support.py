"""A small consortium for the dashboard tests: a plaintext study with DP (ε stated by each site)
and a validation gate (sites release DP histograms, the hub pools an AUC), two closed rounds and
one still collecting with a decline, a secure study that discloses no ε, and strings in the
store that are HTML (a node name and a decline reason), which the page must show as text."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Any

from aipipe.clock import utc_now
from aipipe.wire.messages import CalibrationHistogram, EvalReport
from tests.hub_support import STUDY, Hub, Node, update

XSS = "<img src=x onerror=\"document.title='pwned'\">"
PLAIN: dict[str, Any] = {
    **STUDY,
    "name": "chd-plain",
    "privacy": {"epsilon": 2.0},
    "validation": {"epsilon": 1.0, "bins": 4, "min_patients": 10},
}
SECURE: dict[str, Any] = {**STUDY, "name": "chd-masked", "secure": "secagg", "min_nodes": 3}
# The cumulative ε each site states in its update header, round by round.
EPSILON = {"alpha": (0.5, 1.0), "bravo": (0.6, 1.3)}
ACCURACY = {1: 0.70, 2: 0.74}  # what alpha reports for each round's version (an older node)
NEGATIVES = [30.0, 20.0, 10.0, 5.0]  # the sites' noised validation histograms, 4 bins
POSITIVES = {1: [4.0, 8.0, 15.0, 25.0], 2: [2.0, 5.0, 15.0, 30.0]}  # by round


@dataclass(frozen=True)
class Consortium:
    hub: Hub
    alpha: Node
    bravo: Node
    versions: list[str]  # the plaintext study's versions, round 1 and 2


def build_consortium(hub: Hub) -> Consortium:
    alpha, bravo, charlie = (hub.enrol(n) for n in ("alpha", "bravo", "charlie"))
    study = hub.publish(PLAIN)
    hub.publish(SECURE)
    versions = []
    for index in range(2):
        at = hub.open_round(study)
        if index == 0:  # charlie leaves the study after round 1
            decline(hub, charlie, at.path, "site budget spent", exclude=True)
        for node in (alpha, bravo):
            body = update(node, at, epsilon=EPSILON[node.name][index])
            assert hub.upload(node, at, body).is_success
        info = hub.round(at)
        assert info["state"] == "closed", info
        versions.append(info["result_version"])
        for node in (alpha, bravo):
            report(hub, node, info["result_version"], study["digest"], at.number)
    third = hub.open_round(study)
    decline(hub, alpha, third.path, XSS)
    add_hostile_node(hub)
    return Consortium(hub, alpha, bravo, versions)


def decline(hub: Hub, node: Node, path: str, reason: str, exclude: bool = False) -> None:
    response = hub.client.post(
        f"{path}/decline", json={"reason": reason, "exclude": exclude}, headers=node.headers
    )
    assert response.status_code == 200, response.text


def report(hub: Hub, node: Node, version: str, digest: str, number: int) -> None:
    histogram = CalibrationHistogram(
        study_digest=digest,
        negatives=NEGATIVES,
        positives=POSITIVES[number],
        epsilon=1.0,
        delta=1e-5,
    )
    accuracy = ACCURACY[number] if node.name == "alpha" else None
    body = EvalReport(version=version, calibration=histogram, accuracy=accuracy)
    response = hub.client.post(
        f"/v1/models/{version}/metrics", json=body.model_dump(mode="json"), headers=node.headers
    )
    assert response.status_code == 200, response.text


def add_hostile_node(hub: Hub) -> None:
    """A node row whose name is HTML, as a store written by other software could hold (the API
    refuses such names at enrolment)."""
    conn = sqlite3.connect(hub.paths.store)
    with conn:
        conn.execute(
            "INSERT INTO nodes VALUES (?, ?, ?, 'revoked', ?, NULL)",
            (XSS, "00" * 32, "not-a-credential-hash", utc_now()),
        )
    conn.close()
