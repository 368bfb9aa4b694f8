"""Issue 13: `aipipe node personal` lists a site's personal models beside the global versions
they came from; `aipipe node personal export` lets the served one leave only with
`--allow-phi-derived`, and audits the attempt either way.

A real node home (`init_node`) with the heart-disease study approved in its store, two personal
models saved through the store API with known validation losses, and one global evaluation.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from aipipe.audit.events import AuditEvent
from aipipe.audit.log import AuditLog
from aipipe.node.home import init_node
from aipipe.node.lineage import LocalEvaluation, ModelLineage
from aipipe.node.node import Node
from aipipe.privacy.ledger import BudgetLedger
from aipipe.study.spec import StudySpec
from aipipe.wire.tensors import decode_arrays
from tests.cli_support import assert_user_error, invoke
from tests.personal_support import NAME, personal_study, save_personal, shifted

OLD, NEW = "a" * 64, "b" * 64
WEIGHTS = {"head.weight": np.full((1, 13), 0.25, np.float32), "head.bias": np.zeros(1, np.float32)}


@pytest.fixture
def home(tmp_path: Path) -> Path:
    paths = init_node(tmp_path / "node", "basel")
    spec = StudySpec.model_validate(personal_study())
    with Node.open(paths.home) as node:
        node.store.approve(NAME, spec.digest(), json.dumps(spec.model_dump(mode="json")))
        BudgetLedger(node.store.db).set_budget(NAME, epsilon=1.0, delta=1e-5)
        ModelLineage(node.store.db).save(
            LocalEvaluation(NAME, OLD, 1, n=40, accuracy=0.61, auc=0.66, loss=0.7)
        )
        save_personal(node.store.db, spec, WEIGHTS, version=OLD, number=1, val_loss=0.35)
        save_personal(node.store.db, spec, shifted(WEIGHTS, 1.0), version=NEW, number=2,
                      val_loss=0.6, test_loss=0.2)  # fmt: skip
    return paths.home


def _events(home: Path, action: str) -> list[AuditEvent]:
    with AuditLog.open(home / "audit.sqlite", None) as log:
        return [e for e in log.events() if e.action == action]


def test_personal_lists_each_version_and_the_one_served_on_validation(home: Path) -> None:
    result = invoke("node", "personal", "--home", home, "--study", NAME, "--json")

    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [m["version"] for m in report["models"]] == [OLD, NEW]
    old, new = report["models"]
    assert old["served"] is True and new["served"] is False  # 0.35 < 0.6 on validation
    assert report["served"].startswith("personal-") and report["served"].endswith(OLD)
    assert (old["global_test_accuracy"], old["global_test_auc"]) == (0.61, 0.66)
    assert new["global_test_accuracy"] is None  # not evaluated here
    assert (old["personal_test_accuracy"], old["validation_loss"]) == (0.7, 0.35)
    assert old["chosen"] == {"steps": 7.0} and report["epsilon_spent"] == 0.0

    table = invoke("node", "personal", "--home", home, "--study", NAME)
    assert table.exit_code == 0, table.output
    assert "lowest validation loss" in table.stdout and OLD[:12] in table.stdout


def test_export_is_refused_without_the_flag_and_audited(home: Path, tmp_path: Path) -> None:
    out = tmp_path / "personal.safetensors"

    result = invoke("node", "personal", "export", "--home", home, "--study", NAME, "--out", out)

    line = assert_user_error(result, 2)
    assert "without DP noise" in line and "--allow-phi-derived" in line
    assert not out.exists()
    [event] = _events(home, "personal.export")
    assert event.outcome == "refused" and event.details["allow_phi_derived"] is False


def test_export_with_the_flag_writes_the_served_model_and_audits_it(
    home: Path, tmp_path: Path
) -> None:
    out = tmp_path / "personal.safetensors"

    result = invoke("node", "personal", "export", "--home", home, "--study", NAME, "--out", out,
                    "--allow-phi-derived")  # fmt: skip

    assert result.exit_code == 0, result.output
    written = decode_arrays(out.read_bytes())
    assert all(np.array_equal(written[k], WEIGHTS[k]) for k in WEIGHTS)  # the served (OLD)
    assert out.stat().st_mode & 0o777 == 0o600
    [event] = _events(home, "personal.export")
    assert event.outcome == "success" and event.details["version"] == OLD
    assert len(event.details["sha256"]) == 64
