"""Helpers the site-ledger tests share (test_site_ledger, test_cohort_ledger): the heart-disease
study with only training charged, and a node with a real home, store, ledger and audit log whose
uploads are recorded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from aipipe.node.client import HubClient
from aipipe.node.home import init_node, open_audit, open_store
from aipipe.node.ingest import ingest_files
from aipipe.node.worker import NodeWorker
from aipipe.privacy import BudgetLedger
from tests.e2e_support import HEART

DELTA = 1e-5


def _heart_spec() -> dict[str, Any]:
    raw: dict[str, Any] = yaml.safe_load((HEART / "study.yaml").read_text())
    # No statistics release (tests/test_dp_statistics.py has those): only training is charged.
    return {**raw, "secure": "none", "privacy": {**raw["privacy"], "statistics_epsilon": 0}}


def _node(
    tmp_path: Path, hub: Any, enrolled: Any, study: dict[str, Any]
) -> tuple[NodeWorker, list[bytes]]:
    """A node with a real home, store (Switzerland's FHIR data), ledger and audit log, whose
    hub client records every frame it uploads to the in-process hub."""
    paths = init_node(tmp_path / enrolled.name, enrolled.name)
    store, audit = open_store(paths), open_audit(paths)
    ingest_files(store, [HEART / "fhir" / "switzerland"])
    store.approve(study["name"], study["digest"], json.dumps(study["spec"]))
    BudgetLedger(store.db).set_budget(study["name"], epsilon=1.0, delta=DELTA)
    client = HubClient(
        "http://testserver", token=enrolled.credential, transport=hub.client._transport
    )
    sent: list[bytes] = []
    upload = client.upload

    def recording(name: str, number: int, frame: bytes) -> Any:
        sent.append(frame)
        return upload(name, number, frame)

    client.upload = recording  # type: ignore[method-assign, assignment]
    return NodeWorker(enrolled.name, store, client, enrolled.identity, audit), sent
