"""Disjoint cohorts in the site ledger (issue 10, site ledger: "a study can declare a disjoint
cohort, checked, to be accounted apart").

Studies over disjoint patients do not compose (parallel composition): the site's ε is the
largest group's. A study claims it with `privacy.cohort: disjoint`; the node records each
release's cohort as keyed hashes and checks the claim against every other study's, at the first
release and at every later one. Real node stores (SQLite), real ledger, and for the worker a
real in-process hub.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from aipipe.cli.app import app
from aipipe.node.home import init_node, open_store
from aipipe.privacy import BudgetExhaustedError, BudgetLedger, calibrate_noise, compose_epsilon
from aipipe.privacy.cohorts import Cohort
from aipipe.store.node_store import NodeStore
from tests.hub_support import running_hub
from tests.ledger_support import DELTA, _heart_spec, _node

Q, STEPS = 0.1, 100


def _ledger(store: NodeStore, *studies: str, site: float = 1.0) -> BudgetLedger:
    """Each study's share is the site total: only the site's composition can refuse."""
    ledger = BudgetLedger(store.db)
    ledger.set_site_budget(epsilon=site, delta=DELTA)
    for study in studies:
        ledger.set_budget(study, epsilon=site, delta=DELTA)
    return ledger


def _cohort(store: NodeStore, ids: list[str], disjoint: bool = True) -> Cohort:
    return Cohort(store.cohort_hashes(ids), disjoint=disjoint)


CHD = [f"chd-{i}" for i in range(50)]
STROKE = [f"stroke-{i}" for i in range(50)]


def test_two_studies_over_disjoint_patients_are_accounted_apart(store: NodeStore) -> None:
    ledger = _ledger(store, "chd", "stroke")
    sigma = calibrate_noise(0.9995, DELTA, Q, STEPS, "prv")  # each at 0.9995 of the site's 1.0
    step: dict[str, Any] = {"noise_multiplier": sigma, "sample_rate": Q, "steps": STEPS}

    ledger.charge("chd", 1, **step, cohort=_cohort(store, CHD))
    ledger.charge("stroke", 1, **step, cohort=_cohort(store, STROKE))

    one = compose_epsilon([(sigma, Q, STEPS)], DELTA, "prv")
    assert ledger.site_spent() == pytest.approx(one)  # the max over the groups, not ≈ 1.4
    assert ledger.site_spent() <= 1.0
    groups = ledger.groups()
    assert {s: g.group for s, g in groups.items()} == {"chd": "disjoint", "stroke": "disjoint"}
    assert groups["stroke"].reason == "verified disjoint from every other study"
    assert ledger.entries("stroke")[0].site_epsilon == pytest.approx(one)


def test_one_shared_patient_refuses_the_claim_and_the_release(store: NodeStore) -> None:
    ledger = _ledger(store, "chd", "stroke")
    sigma = calibrate_noise(0.9995, DELTA, Q, STEPS, "prv")
    step: dict[str, Any] = {"noise_multiplier": sigma, "sample_rate": Q, "steps": STEPS}
    ledger.charge("chd", 1, **step, cohort=_cohort(store, CHD))

    with pytest.raises(BudgetExhaustedError) as refused:
        ledger.charge("stroke", 1, **step, cohort=_cohort(store, [*STROKE, CHD[7]]))

    err = refused.value
    assert err.scope == "site"
    assert "disjoint claim refused: 1 of its patients also in study 'chd'" in str(err)
    assert "so it is accounted with the shared site total" in str(err)
    assert ledger.entries("stroke") == []  # nothing left, nothing recorded
    assert ledger.groups()["chd"].group == "disjoint"  # chd is still disjoint from what left
    with pytest.raises(BudgetExhaustedError):  # a claim of "shared" fares no better
        ledger.charge("stroke", 1, **step, cohort=_cohort(store, [*STROKE, CHD[7]], disjoint=False))


def test_a_cohort_that_gains_a_shared_patient_composes_with_the_rest_from_then_on(
    store: NodeStore,
) -> None:
    ledger = _ledger(store, "chd", "stroke", site=5.0)
    step: dict[str, Any] = {"noise_multiplier": 3.0, "sample_rate": Q, "steps": 50}
    ledger.charge("chd", 1, **step, cohort=_cohort(store, CHD))
    ledger.charge("stroke", 1, **step, cohort=_cohort(store, STROKE))
    apart = ledger.site_spent()

    # A new ingest: one chd patient now also meets stroke's cohort.
    ledger.charge("stroke", 2, **step, cohort=_cohort(store, [*STROKE, CHD[0]]))

    history = [(3.0, Q, 50)] * 3
    assert ledger.site_spent() == pytest.approx(compose_epsilon(history, DELTA, "prv"))
    assert ledger.site_spent() > apart
    groups = ledger.groups()
    assert (groups["chd"].group, groups["stroke"].group) == ("shared", "shared")
    assert (
        groups["chd"].reason == "disjoint claim refused: 1 of its patients also in study 'stroke'"
    )
    before = ledger.site_spent()
    ledger.charge("chd", 2, **step, cohort=_cohort(store, CHD))  # disjoint again: stays shared
    assert ledger.groups()["chd"].group == "shared"
    assert ledger.site_spent() > before


def test_a_study_whose_cohort_is_unknown_keeps_every_claim_shared(store: NodeStore) -> None:
    ledger = _ledger(store, "chd", "old", site=5.0)
    step: dict[str, Any] = {"noise_multiplier": 3.0, "sample_rate": Q, "steps": 50}
    ledger.charge("old", 1, **step)  # a release whose patients were not recorded

    ledger.charge("chd", 1, **step, cohort=_cohort(store, CHD))

    assert ledger.groups()["chd"].group == "shared"
    assert "never recorded" in ledger.groups()["chd"].reason
    assert ledger.site_spent() == pytest.approx(compose_epsilon([(3.0, Q, 50)] * 2, DELTA, "prv"))


def test_the_cohort_table_holds_no_patient_id_nor_pseudonym(store: NodeStore) -> None:
    from aipipe.node.ingest import ingest_files
    from tests.e2e_support import HEART

    ingest_files(store, [HEART / "fhir" / "switzerland"])
    ids = dict(store.conn.execute("SELECT id, pseudonym FROM patients"))
    ledger = _ledger(store, "chd")
    ledger.charge(
        "chd", 1, noise_multiplier=6.0, sample_rate=Q, steps=STEPS, cohort=_cohort(store, list(ids))
    )

    rows = list(store.conn.execute("SELECT study, patient_hash FROM privacy_cohorts"))
    assert len(rows) == len(ids) > 0
    stored = " ".join(h for _, h in rows)
    assert not any(pid in stored or alias in stored for pid, alias in ids.items())
    assert store.cohort_hashes(list(ids)) == {h for _, h in rows}  # the same patient, same hash


@pytest.mark.parametrize("statistics", [0, 0.1], ids=["no-stats", "stats"])
@pytest.mark.parametrize("overlap", [False, True])
def test_the_worker_checks_a_disjoint_claim_against_the_other_studies_cohorts(
    tmp_path: Path, overlap: bool, statistics: float
) -> None:
    """With `statistics`, the study's DP statistics are released first, with its cohort."""
    raw = _heart_spec()
    raw["privacy"] = {**raw["privacy"], "cohort": "disjoint", "statistics_epsilon": statistics}
    with running_hub(tmp_path / "hub") as hub:
        alpha = hub.enrol("alpha")
        hub.enrol("beta"), hub.enrol("gamma")
        study = hub.publish(raw)
        at = hub.open_round(study)
        worker, sent = _node(tmp_path, hub, alpha, study)
        store = worker.store
        ledger = BudgetLedger(store.db)
        ledger.set_site_budget(epsilon=1.0, delta=DELTA)
        ledger.set_budget("other", epsilon=1.0, delta=DELTA)
        sigma = calibrate_noise(0.9995, DELTA, Q, STEPS, "prv")
        patients = [r[0] for r in store.conn.execute("SELECT id FROM patients")]
        theirs = patients if overlap else [f"elsewhere-{i}" for i in range(40)]
        ledger.charge(
            "other",
            1,
            noise_multiplier=sigma,
            sample_rate=Q,
            steps=STEPS,
            cohort=_cohort(store, theirs),
        )
        item = at.train_item()
        try:
            summary = worker.handle(item)
            kinds = {(e.study, e.kind) for e in ledger.entries()}
            groups, site = ledger.groups(), ledger.site_spent()
            events = list(worker.audit.events())
        finally:
            store.close()
            worker.audit.close()

    assert len(sent) == 1, summary
    audited = {e.resource: e for e in events if e.action == "privacy.cohort"}
    cohort = audited[f"study/{at.study}"]
    other = compose_epsilon([(sigma, Q, STEPS)], DELTA, "prv")
    if overlap:  # the claim is refused: the round is planned within what the site has left
        assert (groups[at.study].group, cohort.outcome) == ("shared", "refused")
        assert "of its patients also in study 'other'" in cohort.details["reason"]
        assert other < site <= 1.0
        assert audited["study/other"].outcome == "refused"  # its claim goes with it
        return
    assert set(audited) == {f"study/{at.study}"}
    assert ((at.study, "statistics") in kinds) == (statistics > 0)  # released within its group
    assert (groups[at.study].group, cohort.outcome) == ("disjoint", "success")
    assert site == pytest.approx(other)  # the larger group's ε, not the two composed


def test_privacy_status_shows_each_studys_group(tmp_path: Path) -> None:
    paths = init_node(tmp_path / "node", "alpha")
    store = open_store(paths)
    try:
        ledger = _ledger(store, "chd", "stroke", "heart", "later", site=5.0)
        step: dict[str, Any] = {"noise_multiplier": 3.0, "sample_rate": Q, "steps": 50}
        ledger.charge("chd", 1, **step, cohort=_cohort(store, CHD))
        ledger.charge("stroke", 1, **step, cohort=_cohort(store, STROKE))
        ledger.charge("heart", 1, **step, cohort=_cohort(store, CHD[:1]))
    finally:
        store.close()
    home = str(tmp_path / "node")

    result = CliRunner().invoke(app, ["privacy", "status", "--home", home, "--json"])
    text = CliRunner().invoke(app, ["privacy", "status", "--home", home])

    assert result.exit_code == 0, result.output
    studies = {s["study"]: s for s in json.loads(result.stdout)["studies"]}
    assert studies["stroke"]["group"] == "disjoint (verified)"
    assert studies["stroke"]["group_since"]
    assert studies["chd"]["group"] == "shared"  # heart's release shared one of its patients
    assert studies["chd"]["group_reason"] == (
        "disjoint claim refused: 1 of its patients also in study 'heart'"
    )
    assert studies["heart"]["group_reason"] == (
        "disjoint claim refused: 1 of its patients also in study 'chd'"
    )
    assert studies["later"]["group"].startswith("none yet")
    assert text.exit_code == 0, text.output
    assert "disjoint (verified)" in text.stdout.replace("\n", " ")
