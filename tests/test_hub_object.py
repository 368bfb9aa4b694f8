"""Issue 12 item 3: `Hub.open(home)` under `aipipe hub`'s local operations."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from aipipe.audit.log import AuditLog
from aipipe.errors import ConfigError, NodeNotFoundError
from aipipe.hub.hub import Hub
from aipipe.wire import EnrolToken


def test_an_enrolment_token_is_issued_audited_and_the_store_released(tmp_path: Path) -> None:
    hub, admin_token = Hub.init(tmp_path / "hub", "consortium")
    assert admin_token.startswith("aipipe-admin.")

    with hub:
        issued = hub.enrol_token("alpha", url="https://hub.example.org", ttl_s=600)
        store = hub.store

    assert not hub.is_open
    with pytest.raises(sqlite3.ProgrammingError):
        store.conn.execute("SELECT 1")
    token = EnrolToken.decode(issued.token)
    assert (token.node, token.hub_url) == ("alpha", "https://hub.example.org")
    assert issued.expires_at is not None
    with AuditLog.open(tmp_path / "hub" / "audit.sqlite", None) as log:
        [event] = [e for e in log.events() if e.action == "admin"]
    assert event.resource == "node/alpha" and event.details["op"] == "enrol-token"


def test_a_token_without_a_url_needs_a_serving_hub_and_a_missing_home_says_init(
    tmp_path: Path,
) -> None:
    Hub.init(tmp_path / "hub", "consortium")
    with Hub.open(tmp_path / "hub") as hub, pytest.raises(ConfigError, match="not serving"):
        hub.enrol_token("alpha", ttl_s=600)
    with Hub.open(tmp_path / "hub") as hub:
        assert hub.nodes() == []
    with pytest.raises(NodeNotFoundError, match="aipipe hub init"):
        Hub.open(tmp_path / "nothing")
