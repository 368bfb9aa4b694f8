"""Issue 11 item 9 with real processes: a hub and two node daemons train a study whose
`validation:` minimum the model cannot meet; the nodes release their DP histograms (charged to
their ledgers), the hub shows the pooled validation as failed, and `node predict` refuses."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from tests.e2e_support import Federation, aipipe, node_audit_events, wait_until

pytestmark = pytest.mark.e2e

STUDY = "e2e-valid"
VALIDATION = {"min_auc": 0.999, "min_patients": 1, "epsilon": 0.5}
# room for training, the statistics and one validation release per round (3 × ε 0.5)
PRIVACY = {"mode": "dp", "epsilon": 8.0, "delta": 1.0e-5}


def _released(home: Path) -> list[tuple[str, int]]:
    conn = sqlite3.connect(f"file:{home / 'store.sqlite'}?mode=ro", uri=True, timeout=5)
    try:
        rows = conn.execute(
            "SELECT kind, round FROM privacy_ledger WHERE study = ? AND kind = 'validation'",
            (STUDY,),
        ).fetchall()
    finally:
        conn.close()
    return [(str(k), int(r)) for k, r in rows]


def test_a_version_below_the_minimum_is_shown_failed_at_the_hub_and_refused_by_predict(
    tmp_path: Path,
) -> None:
    with Federation.running(
        tmp_path, sites=("hungarian", "switzerland"), deadline_s=120.0, study=STUDY,
        study_fields={"validation": VALIDATION, "privacy": PRIVACY},
    ) as fed:  # fmt: skip
        fed.start_daemons(*fed.nodes)
        fed.open_round(study=STUDY)
        version = fed.wait_for_round(1, "closed", study=STUDY, timeout_s=120)["result_version"]

        def evaluated() -> dict[str, object] | None:
            info = fed.get(f"/v1/models/{version}")
            return info if len(info["metrics"]) == 2 else None

        info = wait_until(evaluated, what="both nodes to evaluate round 1's model",
                          context=fed.group.logs)  # fmt: skip
        shown = info["validation"]
        assert shown["source"] == "dp" and shown["sites"] == 2 and shown["passed"] is False
        assert "min_auc 0.999" in shown["failures"][0]
        for home in fed.nodes.values():
            assert _released(home) == [("validation", 1)]

        table = aipipe("model", "show", version[:12], env=fed.admin_env).stdout
        assert "not served" in table and "calibration" in table and "min_auc 0.999" in table

        home = fed.nodes["hungarian"]
        refused = aipipe("node", "predict", "--home", home, "--study", STUDY, "--json",
                         check=False)  # fmt: skip
        assert refused.returncode != 0, refused.stdout
        assert "validation minimum" in refused.stderr and "min_auc 0.999" in refused.stderr
        events = [e for e in node_audit_events(home) if e["action"] == "validation"]
        assert events[-1]["outcome"] == "refused" and events[-1]["details"]["use"] == "predict"
