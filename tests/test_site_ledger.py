"""The site ledger (issue 10, items 1, 2, 7 and the reported protection).

The patients of a site are the same whichever study asks: the site's ε composes every release of
every study, each release is charged with the digest of its exact bytes, a re-offered round gets
those bytes again or a refusal, and the solo baseline is charged or marked benchmark-only.
All against real node stores (SQLite) and, for the re-offer, a real in-process hub.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from aipipe.cli.app import app
from aipipe.errors import UpdateRejectedError
from aipipe.node.baseline import train_alone
from aipipe.node.home import init_node, open_store
from aipipe.node.ingest import ingest_files
from aipipe.privacy import (
    BudgetExhaustedError,
    BudgetLedger,
    PrivacyError,
    calibrate_noise,
    compose_epsilon,
    membership_accuracy_bound,
)
from aipipe.store.node_store import NodeStore
from aipipe.study.features import extract
from aipipe.study.spec import StudySpec
from tests.e2e_support import HEART
from tests.hub_support import running_hub
from tests.ledger_support import DELTA, _heart_spec, _node

Q, STEPS = 0.1, 100  # one study's whole plan: 100 DP-SGD steps at sample rate 0.1


# -- item 1: one budget per site, across studies -------------------------------------------------


def test_a_second_study_over_the_same_patients_is_refused_once_the_site_total_is_spent(
    store: NodeStore,
) -> None:
    ledger = BudgetLedger(store.db)
    ledger.set_site_budget(epsilon=1.0, delta=DELTA)
    for study in ("chd", "stroke"):
        ledger.set_budget(study, epsilon=1.0, delta=DELTA)
    sigma = calibrate_noise(0.9995, DELTA, Q, STEPS, "prv")  # each study at 0.9995 of its 1.0
    ledger.charge("chd", 1, noise_multiplier=sigma, sample_rate=Q, steps=STEPS)

    with pytest.raises(BudgetExhaustedError) as refused:
        ledger.charge("stroke", 1, noise_multiplier=sigma, sample_rate=Q, steps=STEPS)

    both = compose_epsilon([(sigma, Q, STEPS)] * 2, DELTA, "prv")
    assert both > 1.4  # what a patient in both studies would have paid: ε ≈ 1.4
    err = refused.value
    assert err.scope == "site" and err.budget == 1.0
    assert err.needed == pytest.approx(both - err.spent)
    assert str(err) == (
        f"round 1 needs ε={err.needed:.2f} but {1.0 - err.spent:.2f} of 1.00 is left for the "
        "site (all studies; this is study 'stroke'); lower rounds or raise the site budget"
    )
    assert ledger.entries("stroke") == []
    assert ledger.site_spent() == pytest.approx(ledger.spent("chd"))


def test_without_a_site_total_the_largest_share_bounds_all_studies_together(
    store: NodeStore,
) -> None:
    ledger = BudgetLedger(store.db)  # an existing home: shares only, no site total yet
    for study in ("chd", "stroke"):
        ledger.set_budget(study, epsilon=1.0, delta=DELTA)
    sigma = calibrate_noise(0.9995, DELTA, Q, STEPS, "prv")
    ledger.charge("chd", 1, noise_multiplier=sigma, sample_rate=Q, steps=STEPS)

    with pytest.raises(BudgetExhaustedError):
        ledger.charge("stroke", 1, noise_multiplier=sigma, sample_rate=Q, steps=STEPS)


def test_the_sites_epsilon_is_the_composition_of_every_studys_history(store: NodeStore) -> None:
    ledger = BudgetLedger(store.db)
    ledger.set_site_budget(epsilon=5.0, delta=DELTA)
    ledger.set_budget("chd", epsilon=3.0, delta=DELTA)
    ledger.set_budget("stroke", epsilon=3.0, delta=DELTA)
    chd, stroke = [(3.0, Q, 50), (3.0, Q, 50)], [(2.5, 0.05, 80)]
    for number, (sigma, q, steps) in enumerate(chd, start=1):
        ledger.charge("chd", number, noise_multiplier=sigma, sample_rate=q, steps=steps)
    ledger.charge("stroke", 1, noise_multiplier=2.5, sample_rate=0.05, steps=80)

    site = ledger.site_spent()

    assert site == pytest.approx(compose_epsilon(chd + stroke, DELTA, "prv"))
    assert ledger.spent("chd") == pytest.approx(compose_epsilon(chd, DELTA, "prv"))
    assert max(ledger.spent("chd"), ledger.spent("stroke")) < site
    assert site < ledger.spent("chd") + ledger.spent("stroke")
    assert ledger.entries("stroke")[0].site_epsilon == pytest.approx(site)


def test_noise_is_planned_within_what_is_left_of_the_site(store: NodeStore) -> None:
    ledger = BudgetLedger(store.db)
    ledger.set_site_budget(epsilon=1.0, delta=DELTA)
    ledger.set_budget("chd", epsilon=1.0, delta=DELTA)
    ledger.set_budget("stroke", epsilon=1.0, delta=DELTA)
    ledger.charge("chd", 1, noise_multiplier=6.0, sample_rate=Q, steps=STEPS)  # ε ≈ 0.63
    prior = [(6.0, Q, STEPS)]

    sigma = ledger.calibrate("stroke", 1, sample_rate=Q, steps=STEPS, accountant="prv")

    assert sigma > calibrate_noise(1.0, DELTA, Q, STEPS, "prv")  # its share alone allows less
    site_after = compose_epsilon([*prior, (sigma, Q, STEPS)], DELTA, "prv")
    assert 0.98 < site_after <= 1.0
    ledger.charge("stroke", 1, noise_multiplier=sigma, sample_rate=Q, steps=STEPS)


def test_a_ledger_written_before_the_site_ledger_is_migrated_and_keeps_charging(
    tmp_path: Path,
) -> None:
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as conn:  # the per-study schema of issue 9
        conn.execute(
            "CREATE TABLE [privacy_budget] ([study] TEXT PRIMARY KEY, [epsilon_budget] FLOAT "
            "NOT NULL, [delta] FLOAT NOT NULL)"
        )
        conn.execute(
            "CREATE TABLE [privacy_ledger] ([study] TEXT, [round] INTEGER, [epsilon] FLOAT, "
            "[delta] FLOAT, [noise_multiplier] FLOAT, [sample_rate] FLOAT, [steps] INTEGER, "
            "[accountant] TEXT, [time] TEXT, PRIMARY KEY ([study], [round]))"
        )
        conn.execute("INSERT INTO privacy_budget VALUES ('chd', 1.0, 1e-5)")
        conn.execute(
            "INSERT INTO privacy_ledger VALUES ('chd', 1, 0.46, 1e-5, 8.0, 0.1, 100, 'prv', "
            "'2024-01-01T00:00:00')"
        )
    store = NodeStore.open(path, b"")
    try:
        ledger = BudgetLedger(store.db)
        (entry,) = ledger.entries("chd")
        assert (entry.kind, entry.round, entry.digest) == ("train", 1, None)
        assert ledger.site_spent() == pytest.approx(compose_epsilon([(8.0, Q, 100)], DELTA, "prv"))
        assert ledger.released("chd", "train", 1) == (entry, None)
        ledger.charge("chd", 2, noise_multiplier=8.0, sample_rate=Q, steps=50, payload=b"x")
        assert [e.round for e in ledger.entries("chd")] == [1, 2]
    finally:
        store.close()


# -- reported protection -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("epsilon", "delta", "accuracy"),
    [
        (0.0, 0.0, 0.5),  # no information: a coin flip
        (1.0, 1e-5, 0.7310612680),  # (e + 1e-5)/(1 + e)
        (0.5, 1e-5, 0.6224631066),  # (e^0.5 + 1e-5)/(1 + e^0.5)
        (0.0, 0.2, 0.6),  # ε = 0: only δ helps, (1 + δ)/2
        (1000.0, 1e-5, 1.0),
    ],
)
def test_the_membership_inference_bound_is_e_eps_plus_delta_over_one_plus_e_eps(
    epsilon: float, delta: float, accuracy: float
) -> None:
    assert membership_accuracy_bound(epsilon, delta) == pytest.approx(accuracy, abs=1e-9)


def test_privacy_status_shows_the_site_and_each_study_beside_the_attackers_bound(
    tmp_path: Path,
) -> None:
    paths = init_node(tmp_path / "node", "alpha")
    store = open_store(paths)
    try:
        ledger = BudgetLedger(store.db)
        ledger.set_budget("chd", epsilon=1.0, delta=DELTA)
        ledger.set_budget("stroke", epsilon=0.5, delta=DELTA)
        ledger.charge("chd", 1, noise_multiplier=6.0, sample_rate=Q, steps=STEPS)
    finally:
        store.close()
    runner = CliRunner()
    home = str(tmp_path / "node")

    set_total = runner.invoke(app, ["privacy", "budget", "--home", home, "--site-epsilon", "3"])
    result = runner.invoke(app, ["privacy", "status", "--home", home, "--json"])

    assert set_total.exit_code == 0, set_total.output
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    site, studies = report["site"], {s["study"]: s for s in report["studies"]}
    spent = compose_epsilon([(6.0, Q, STEPS)], DELTA, "prv")
    assert (site["epsilon_budget"], site["delta"], site["releases"]) == (3.0, DELTA, 1)
    assert site["spent"] == pytest.approx(spent)
    assert site["attacker_accuracy_max"] == pytest.approx(
        (np.exp(spent) + DELTA) / (1 + np.exp(spent))
    )
    assert studies["chd"]["spent"] == pytest.approx(spent)
    assert (studies["stroke"]["epsilon_budget"], studies["stroke"]["spent"]) == (0.5, 0.0)
    assert studies["stroke"]["attacker_accuracy_max"] == pytest.approx(0.5 + DELTA / 2)


# -- item 2: one release per (study, round) ------------------------------------------------------


def test_a_round_offered_again_gets_the_same_bytes_and_is_charged_once(tmp_path: Path) -> None:
    with running_hub(tmp_path / "hub") as hub:
        alpha = hub.enrol("alpha")
        hub.enrol("beta"), hub.enrol("gamma")
        study = hub.publish(_heart_spec())
        at = hub.open_round(study)
        worker, sent = _node(tmp_path, hub, alpha, study)
        item = at.train_item()
        try:
            first = worker.handle(item)
            with contextlib.suppress(UpdateRejectedError):  # this hub refuses a duplicate
                worker.handle(item)  # the hub offers the same round again
            ledger = BudgetLedger(worker.store.db)
            entries = ledger.entries(at.study)
        finally:
            worker.store.close()
            worker.audit.close()

    assert "sent update" in first, first
    assert len(sent) == 2
    assert sent[1] == sent[0]  # the same bytes, not a new draw with fresh noise
    (entry,) = entries
    assert entry.digest == hashlib.sha256(sent[0]).hexdigest()


def test_a_round_whose_bytes_were_not_kept_is_refused_when_offered_again(tmp_path: Path) -> None:
    with running_hub(tmp_path / "hub") as hub:
        alpha = hub.enrol("alpha")
        hub.enrol("beta"), hub.enrol("gamma")
        study = hub.publish(_heart_spec())
        at = hub.open_round(study)
        worker, sent = _node(tmp_path, hub, alpha, study)
        ledger = BudgetLedger(worker.store.db)
        # released by a ledger that kept no bytes (before issue 10, or a SecAgg+ round)
        ledger.charge(at.study, at.number, noise_multiplier=8.0, sample_rate=0.2, steps=10)
        item = at.train_item()
        try:
            summary = worker.handle(item)
            entries = ledger.entries(at.study)
        finally:
            worker.store.close()
            worker.audit.close()

    assert "declined" in summary and "released already" in summary, summary
    assert sent == []
    assert len(entries) == 1


@pytest.mark.parametrize("site_total", [1.0, 0.5])
def test_the_worker_plans_a_study_within_what_other_studies_left_of_the_site(
    tmp_path: Path, site_total: float
) -> None:
    with running_hub(tmp_path / "hub") as hub:
        alpha = hub.enrol("alpha")
        hub.enrol("beta"), hub.enrol("gamma")
        study = hub.publish(_heart_spec())
        at = hub.open_round(study)
        worker, sent = _node(tmp_path, hub, alpha, study)
        ledger = BudgetLedger(worker.store.db)
        ledger.set_budget("other", epsilon=1.0, delta=DELTA)
        ledger.charge("other", 1, noise_multiplier=6.0, sample_rate=Q, steps=STEPS)  # ε ≈ 0.63
        ledger.set_site_budget(epsilon=site_total, delta=DELTA)  # 0.5: the steward lowered it
        item = at.train_item()
        try:
            summary = worker.handle(item)
            entries = ledger.entries(at.study)
        finally:
            worker.store.close()
            worker.audit.close()

    spec = StudySpec.model_validate(study["spec"])
    planned = spec.training.rounds * spec.training.local_steps
    other = (6.0, Q, STEPS)
    if site_total == 0.5:  # the other study spent more than the whole site total
        assert "budget exhausted, declined" in summary, summary
        assert sent == [] and entries == []
        return
    (entry,) = entries
    whole = compose_epsilon(
        [other, (entry.noise_multiplier, entry.sample_rate, planned)], DELTA, "prv"
    )
    assert 0.98 < whole <= 1.0  # the whole planned study fits what the other study left
    assert entry.site_epsilon is not None and entry.site_epsilon < whole
    assert len(sent) == 1


# -- item 7: the solo baseline -------------------------------------------------------------------


def test_the_solo_baseline_is_charged_to_the_site_ledger_or_marked_benchmark_only(
    tmp_path: Path,
) -> None:
    paths = init_node(tmp_path / "node", "alpha")
    store = open_store(paths)
    try:
        ingest_files(store, [HEART / "fhir" / "switzerland"])
        spec = StudySpec.model_validate(_heart_spec())
        matrix = extract(store, spec)
        ledger = BudgetLedger(store.db)
        ledger.set_budget(spec.name, epsilon=1.0, delta=DELTA)

        with pytest.raises(PrivacyError, match="benchmark_only"):
            train_alone(matrix, spec)
        train_alone(matrix, spec, benchmark_only=True, seed=0)
        assert ledger.entries() == []
        result = train_alone(matrix, spec, ledger=ledger)
        (entry,) = ledger.entries(spec.name)
        train_alone(matrix, spec, ledger=ledger)  # planned into what the first one left
        first, second = ledger.entries(spec.name)
        spent = ledger.site_spent()
    finally:
        store.close()

    assert entry.kind == "baseline" and 0.99 < entry.epsilon <= 1.0
    assert result.n == len(matrix.y_test)
    assert (first.kind, second.kind, second.round) == ("baseline", "baseline", 2)
    assert second.noise_multiplier > 10 * first.noise_multiplier
    assert spent <= 1.0
