"""Robust aggregators in real plaintext rounds at the hub: published studies, signed updates,
each update kept as a blob and aggregated in `finish`, a restarted hub in between."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.hub_support import STUDY, running_hub
from tests.test_round_protocols import Site, base_of, body, delta_of, result_of, service_of

MEDIAN = {**STUDY, "name": "median", "min_nodes": 3, "aggregation": {"name": "median"}}
CLIPPED = {
    **STUDY,
    "name": "clipped",
    "min_nodes": 3,
    "aggregation": {"name": "centered_clip", "clip_radius": 0.5},
}


@pytest.fixture
def robust_site(tmp_path: Path) -> Iterator[Site]:
    with running_hub(tmp_path / "hub") as hub:
        nodes = [hub.enrol(name) for name in ("alpha", "bravo", "charlie")]
        hub.publish(MEDIAN)
        hub.publish(CLIPPED)
        yield Site(hub.paths, nodes)


def run_round(site: Site, study: str, scales: tuple[float, ...], *, restart_after: int) -> int:
    """Every node sends a delta of `scales[i]` in each coordinate; the hub restarts midway."""
    with service_of(site) as first:
        number = first.open_round(study, 60).round
        spec, base = first.spec(study), base_of(first, study, number)
        for node, scale in list(zip(site.nodes, scales, strict=True))[:restart_after]:
            d = delta_of(base, scale)
            first.protocols.for_spec(spec).accept(
                spec, node.name, number, body(first, node, study, number, d, 10)
            )
    with service_of(site) as restarted:
        for node, scale in list(zip(site.nodes, scales, strict=True))[restart_after:]:
            d = delta_of(base, scale)
            restarted.protocols.for_spec(spec).accept(
                spec, node.name, number, body(restarted, node, study, number, d, 10)
            )
    return number


def test_a_median_study_ignores_one_outlying_node_across_a_hub_restart(robust_site: Site) -> None:
    number = run_round(robust_site, "median", (0.1, 3.0, -0.2), restart_after=1)

    with service_of(robust_site) as service:
        base, model = base_of(service, "median", number), result_of(service, "median", number)
        row = service.store.round("median", number)
        assert row is not None and row.result_version is not None
        assert service.models.info(row.result_version).aggregator == "median"
    for key, value in model.items():
        np.testing.assert_allclose(value, base[key] + 0.1, rtol=1e-6)


def test_centered_clip_carries_its_centre_to_the_next_round_through_the_store(
    robust_site: Site,
) -> None:
    # Every node sends 1.0 in each of d coordinates (norm √d > τ = 0.5). Round 1 clips each to
    # 0.5 around 0: the model moves by 0.5 along u = (1, …, 1)/√d. Round 2 starts from that centre
    # and clips again by 0.5: the model moves by 0.5 + 0.5 = 1.0 along u.
    moves = []
    for _ in range(2):
        number = run_round(robust_site, "clipped", (1.0, 1.0, 1.0), restart_after=2)
        with service_of(robust_site) as service:
            base, model = base_of(service, "clipped", number), result_of(service, "clipped", number)
        moves.append({key: model[key] - base[key] for key in base})
    d = sum(v.size for v in moves[0].values())
    assert np.sqrt(d) > 0.5 + 1.0  # each update is clipped in both rounds
    for first, second in zip(moves[0].values(), moves[1].values(), strict=True):
        np.testing.assert_allclose(first, 0.5 / np.sqrt(d), rtol=1e-5)
        np.testing.assert_allclose(second, 1.0 / np.sqrt(d), rtol=1e-5)


def test_a_krum_study_whose_min_nodes_cannot_satisfy_krum_is_refused_at_publish(
    tmp_path: Path,
) -> None:
    krum = {**STUDY, "name": "krum", "min_nodes": 4, "aggregation": {"name": "krum",
            "byzantine": 1}}  # fmt: skip
    with running_hub(tmp_path / "hub") as hub:
        response = hub.client.post("/v1/studies", json={"spec": krum}, headers=hub.admin)
        assert response.status_code == 422, response.text
        assert "2f + 3 = 5" in response.json()["detail"]
        assert "min_nodes" in response.json()["detail"]
        hub.publish({**krum, "min_nodes": 5})
