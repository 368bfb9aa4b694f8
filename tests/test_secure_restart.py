"""A hub restarted during a SecAgg+ round: the masked sum lived in its memory, so the round
fails with a reason instead of waiting for masks that can no longer be removed."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from aipipe.hub.app import create_app
from aipipe.hub.home import init_hub
from tests.test_hub_app import STUDY, Hub


def test_a_hub_restarted_mid_secagg_round_fails_that_round_with_a_reason(tmp_path: Path) -> None:
    paths, token = init_hub(tmp_path / "hub", "test-hub")
    with TestClient(create_app(paths)) as client:
        hub = Hub(client, paths, token)
        for name in ("alpha", "beta", "gamma"):
            hub.enrol(name)
        at = hub.open_round(hub.publish({**STUDY, "secure": "secagg", "min_nodes": 3}))
        before = hub.round(at)

    with TestClient(create_app(paths)) as client:
        after = Hub(client, paths, token).round(at)

    assert (before["state"], before["stage"]) == ("open", "advertising")
    assert after["state"] == "failed"
    assert "restarted during this SecAgg+ round" in after["reason"]
