"""A personalized study's round asks of the hub what a plain one's does (issue 13's cost target,
docs/BENCHMARKS.md "Cost, whole round with real processes").

Every node downloads the round's base weights to train and the result's weights to evaluate:
eight downloads a round with four sites, each served on the hub's event loop. The access check
in front of them read the whole model card, which for a personalized study parses the spec
and builds the method's torch model to name its shared and local tensors: the finetune round
took longer than the plain one at the hub, before any node work.
"""

from __future__ import annotations

from typing import Any

import pytest

from aipipe.personalization.base import Personalizer
from tests.hub_support import STUDY, Hub, Node

PERSONAL = {**STUDY, "name": "hub-test-finetune", "personalization": {"method": "finetune"}}


def _builds(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every model a personalization method builds from now on (the real build runs)."""
    built: list[str] = []
    build = Personalizer.build

    def counted(self: Personalizer, n_features: int, **kwargs: Any) -> Any:
        built.append(self.name)
        return build(self, n_features, **kwargs)

    monkeypatch.setattr(Personalizer, "build", counted)
    return built


def test_a_node_downloads_a_personalized_version_without_the_hub_building_a_model(
    hub: Hub, pair: tuple[Node, Node], monkeypatch: pytest.MonkeyPatch
) -> None:
    at = hub.open_round(hub.publish(PERSONAL))
    built = _builds(monkeypatch)
    for node in pair:
        response = hub.client.get(f"/v1/models/{at.base_version}/weights", headers=node.headers)
        assert response.status_code == 200, response.text
    assert built == []
    # What a person reads of the version still names the method's shared and local tensors.
    card = hub.client.get(f"/v1/models/{at.base_version}", headers=hub.admin).json()
    assert card["personalization"]["method"] == "finetune"
    assert sorted(card["personalization"]["shared"]) == sorted(at.base)


def test_the_weights_of_a_version_stay_scoped_to_the_nodes_taking_part(
    hub: Hub, pair: tuple[Node, Node]
) -> None:
    at = hub.open_round(hub.publish(PERSONAL))
    late = hub.enrol("gamma")  # enrolled after the round chose its nodes: takes no part
    path = f"/v1/models/{at.base_version}/weights"
    assert hub.client.get(path, headers=late.headers).status_code == 403
    missing = hub.client.get(f"/v1/models/{'0' * 64}/weights", headers=pair[0].headers)
    assert missing.status_code == 404


def test_reading_a_personalized_versions_card_again_builds_no_model(
    hub: Hub, pair: tuple[Node, Node], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`model show` and the `/v1/models` listing read one card per version: the method's model
    is built once per study spec, not once per card read on the hub's event loop."""
    at = hub.open_round(hub.publish(PERSONAL))
    built = _builds(monkeypatch)
    cards = [
        hub.client.get(f"/v1/models/{at.base_version}", headers=hub.admin).json() for _ in range(3)
    ]
    listed = hub.client.get("/v1/models", params={"study": PERSONAL["name"]}, headers=hub.admin)
    assert listed.status_code == 200, listed.text
    assert len(built) <= 1
    assert all(c["personalization"] == cards[0]["personalization"] for c in cards)
    assert listed.json()[0]["personalization"] == cards[0]["personalization"]
