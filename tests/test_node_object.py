"""Issue 12 item 3: `Node.open(home)` under the CLI; each operation audits itself.

Real node homes (`init_node`), real stores and audit logs, the example FHIR data, and for the
operations that talk to the hub a real hub app served in-process.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from aipipe.audit.events import AuditEvent
from aipipe.audit.log import AuditLog
from aipipe.cli.app import app
from aipipe.errors import ConfigError
from aipipe.node.client import HubClient
from aipipe.node.home import init_node
from aipipe.node.node import Node
from aipipe.study.spec import StudySpec, load_study
from tests.hub_support import running_hub

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "heart-disease"
SITE = EXAMPLE / "fhir" / "switzerland"
STUDY_FILE = EXAMPLE / "study.yaml"


@pytest.fixture
def home(tmp_path: Path) -> Path:
    init_node(tmp_path / "node", "basel")
    return tmp_path / "node"


def events(home: Path, action: str) -> list[AuditEvent]:
    with AuditLog.open(home / "audit.sqlite", None) as log:
        return [e for e in log.events() if e.action == action]


def test_ingest_from_files_needs_no_hub_and_audits_itself(home: Path) -> None:
    with Node.open(home) as node:
        report = node.ingest_files([SITE])
        with pytest.raises(ConfigError, match="not enrolled"):
            _ = node.hub  # this node has no hub: ingest never asked for one

    assert report.total("stored") > 0 and report.files == 3
    [event] = events(home, "ingest")
    assert event.actor == "basel" and event.resource == "files"
    assert event.details["files"] == 3
    assert event.details["stored"] == report.total("stored")


def test_extract_through_the_node_audits_it_with_counts_only(home: Path) -> None:
    spec = load_study(STUDY_FILE)
    with Node.open(home) as node:
        node.ingest_files([SITE])
        matrix = node.extract(spec)

    [event] = events(home, "features.extract")
    assert event.resource == f"study/{spec.name}"
    assert event.details == {  # counts as the worker records them, and what was extracted
        "cohort": matrix.cohort,
        "train": len(matrix.train_ids),
        "validation": len(matrix.val_ids),
        "test": len(matrix.test_ids),
        "digest": spec.digest(),
        "approved": False,
    }


def test_study_features_on_the_cli_is_audited_on_the_node(home: Path) -> None:
    """Before the Node, `study features` extracted without an audit event."""
    runner = CliRunner()
    ingested = runner.invoke(app, ["node", "ingest", "--home", str(home), str(SITE), "--json"])
    assert ingested.exit_code == 0, ingested.output

    result = runner.invoke(app, ["study", "features", str(STUDY_FILE), "--home", str(home)])

    assert result.exit_code == 0, result.output
    [event] = events(home, "features.extract")
    assert event.actor == "basel" and event.details["approved"] is False


def test_extract_or_predict_by_name_needs_an_approval_and_no_hub(home: Path) -> None:
    with Node.open(home) as node:
        with pytest.raises(ConfigError, match="not approved here"):
            node.extract("fed-heart-disease")
        with pytest.raises(ConfigError, match="not approved here"):
            node.predict("fed-heart-disease")

    assert events(home, "features.extract") == [] and events(home, "predict") == []


def test_approve_pins_the_hub_digest_sets_the_share_and_audits_it(
    home: Path, tmp_path: Path
) -> None:
    spec = load_study(STUDY_FILE)
    with running_hub(tmp_path / "hub") as hub:
        published = hub.publish(spec.model_dump(mode="json"))
        alpha = hub.enrol("basel")
        client = HubClient("http://testserver", token=alpha.credential,
                           transport=hub.client._transport)  # fmt: skip
        with Node.open(home, hub=client) as node:
            approval = node.approve(spec.name, epsilon=0.5)
            node.ingest_files([SITE])
            node.extract(spec.name)
            assert node.store.approval(spec.name) is not None

    assert approval.digest == published["digest"] == spec.digest()
    assert approval.epsilon_budget == 0.5 and approval.columns == spec.columns()
    [approved] = events(home, "study.approve")
    assert approved.details == {"digest": spec.digest(), "epsilon_budget": 0.5}
    [extracted] = events(home, "features.extract")
    assert extracted.details["approved"] is True


def test_a_closed_node_releases_its_store_and_audit_log(home: Path) -> None:
    node = Node.open(home)
    store, audit = node.store, node.audit
    assert node.is_open

    node.close()
    node.close()  # twice is fine

    assert not node.is_open
    with pytest.raises(sqlite3.ProgrammingError):
        store.conn.execute("SELECT 1")
    with pytest.raises(sqlite3.ProgrammingError):
        list(audit.events())


def test_the_with_block_closes_the_node_on_an_error(home: Path) -> None:
    held: dict[str, Any] = {}
    with pytest.raises(ConfigError), Node.open(home) as node:
        held["store"] = node.store
        node.approved_spec("absent")

    assert not node.is_open
    with pytest.raises(sqlite3.ProgrammingError):
        held["store"].conn.execute("SELECT 1")


def test_opening_a_node_and_its_cli_imports_no_torch() -> None:
    code = "import sys, aipipe.cli.app, aipipe.node.node; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_init_and_the_site_budget_audit_themselves(tmp_path: Path) -> None:
    with Node.init(tmp_path / "fresh", "bern") as node:
        spent = node.set_site_budget(epsilon=3.0, delta=1e-5)
        with pytest.raises(ConfigError, match="no SMART client"):
            node.smart_jwks()

    assert spent == 0.0
    home = tmp_path / "fresh"
    assert [e.resource for e in events(home, "node.init")] == ["node/bern"]
    [budget] = events(home, "privacy.site_budget")
    assert budget.details == {"epsilon_budget": 3.0, "delta": 1e-5, "spent": 0.0}


def test_predict_scores_with_the_hub_model_and_audits_it(home: Path, tmp_path: Path) -> None:
    spec = StudySpec.model_validate({**load_study(STUDY_FILE).model_dump(), "min_nodes": 1})
    with running_hub(tmp_path / "hub") as hub:
        published = hub.publish(spec.model_dump(mode="json"))
        alpha = hub.enrol("basel")
        assert hub.post_round(spec.name).status_code == 200  # basel takes part: sees models
        client = HubClient("http://testserver", token=alpha.credential,
                           transport=hub.client._transport)  # fmt: skip
        with Node.open(home, hub=client) as node:
            node.approve(spec.name)
            node.ingest_files([SITE])
            scores = node.predict(spec.name)
            worker = node.worker(lambda line: None)
            assert worker.store is node.store and worker.audit is node.audit

    assert scores.version == published["current_version"]
    assert scores.scored and scores.written == 0
    [event] = events(home, "predict")
    assert event.resource == f"study/{spec.name}"
    assert event.details == {
        "model": scores.version,
        "scored": len(scores.scored),
        "written": 0,
        "as_of": "now",
    }
