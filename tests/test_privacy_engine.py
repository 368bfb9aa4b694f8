"""The privacy engine: one object plans (σ, q, steps, ε after), charges the site ledger and makes
the DP optimizer. The pinned numbers were computed with the code it replaced (the worker's
`_charge_budget`, training's `_noise`, the baseline's calibration) on the same ledger states:
the engine must plan exactly what they planned."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.optimizers import DPOptimizerFastGradientClipping
from sqlite_utils import Database

from aipipe.models import build_model
from aipipe.privacy.accountant import (
    accountant_for,
    accountant_names,
    calibrate_noise,
    compose_epsilon,
)
from aipipe.privacy.engine import Plan, PrivacyEngine
from aipipe.privacy.errors import (
    BudgetExhaustedError,
    RoundAlreadyReleasedError,
    UnknownAccountantError,
)
from aipipe.privacy.ledger import BudgetLedger
from aipipe.privacy.ledger_records import BASELINE, TRAIN
from aipipe.study.spec import StudySpec, load_study

EXAMPLE = Path(__file__).resolve().parents[1] / "examples/heart-disease/study.yaml"
DELTA = 1e-5
ROWS = 300  # q = 32/300 with the example's batch of 32; 10 rounds × 10 local steps
Q = 32 / 300


def study(name: str = "chd", accountant: str = "prv") -> StudySpec:
    spec = load_study(EXAMPLE)
    privacy = spec.privacy.model_copy(update={"accountant": accountant})
    return spec.model_copy(update={"name": name, "privacy": privacy})


def ledger_with(*shares: str, site: float | None = None) -> BudgetLedger:
    ledger = BudgetLedger(Database(memory=True))
    if site is not None:
        ledger.set_site_budget(epsilon=site, delta=DELTA)
    for name in shares:
        ledger.set_budget(name, epsilon=1.0, delta=DELTA)
    return ledger


# -- planning: the same σ and ε as before --------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "sigma", "first", "second"),
    [
        ("prv", 4.22265625, 0.315469076809864, 0.4407320023408171),
        ("rdp", 4.54296875, 0.31486445666748186, 0.44062867708520437),
    ],
)
def test_a_study_is_planned_over_all_its_rounds_and_keeps_its_sigma(
    name: str, sigma: float, first: float, second: float
) -> None:
    engine = PrivacyEngine(ledger_with("chd"))
    spec = study(accountant=name)

    plan = engine.plan_round(spec, 1, ROWS)
    assert (plan.noise_multiplier, plan.sample_rate, plan.steps) == (sigma, Q, 10)
    assert (plan.study, plan.round, plan.kind, plan.accountant) == ("chd", 1, TRAIN, name)
    assert plan.epsilon == pytest.approx(first, rel=1e-9)

    engine.charge(plan, b"round 1")
    again = engine.plan_round(spec, 2, ROWS)

    assert again.noise_multiplier == sigma  # the first round's σ, not a new calibration
    assert again.epsilon == pytest.approx(second, rel=1e-9)


def test_a_second_study_is_planned_within_what_is_left_of_the_site() -> None:
    ledger = ledger_with("chd", "stroke", site=1.0)
    ledger.charge("chd", 1, noise_multiplier=6.0, sample_rate=0.1, steps=100, payload=b"c")

    plan = PrivacyEngine(ledger).plan_round(study("stroke"), 1, ROWS)

    assert plan.noise_multiplier == 5.40234375  # its share alone would allow 4.22
    assert plan.epsilon == pytest.approx(0.23567878945947449, rel=1e-9)


def test_a_baseline_is_planned_as_one_run_of_the_whole_study() -> None:
    engine = PrivacyEngine(ledger_with("chd"))

    plan = engine.plan_baseline(study(), ROWS)

    assert (plan.noise_multiplier, plan.sample_rate, plan.steps) == (4.22265625, Q, 100)
    assert (plan.kind, plan.round) == (BASELINE, 1)


def test_local_training_without_a_ledger_is_planned_against_the_studys_epsilon() -> None:
    spec = study()

    plan = PrivacyEngine.plan_local(spec.training, spec.privacy, ROWS)

    assert (plan.noise_multiplier, plan.sample_rate, plan.steps) == (4.22265625, Q, 10)
    assert plan.epsilon == pytest.approx(0.315469076809864, rel=1e-9)  # this round's steps alone


def test_a_given_noise_multiplier_is_kept_and_its_round_epsilon_reported() -> None:
    spec = study()

    plan = PrivacyEngine.plan_local(spec.training, spec.privacy, ROWS, noise_multiplier=2.0)

    assert plan.noise_multiplier == 2.0
    assert plan.epsilon == pytest.approx(compose_epsilon([(2.0, Q, 10)], DELTA, "prv"))


# -- charging: once per round, before the bytes leave ------------------------------------------


def test_a_charged_plan_cannot_release_other_bytes_nor_be_planned_again() -> None:
    ledger = ledger_with("chd")
    engine = PrivacyEngine(ledger)
    spec = study()
    plan = engine.plan_round(spec, 1, ROWS)

    entry = engine.charge(plan, b"first draw")

    assert entry.digest == hashlib.sha256(b"first draw").hexdigest()
    assert ledger.released("chd", TRAIN, 1) == (entry, b"first draw")  # bytes kept to resend
    assert engine.charge(plan, b"first draw") == entry  # the same bytes again: the same release
    with pytest.raises(RoundAlreadyReleasedError):
        engine.charge(plan, b"a second draw")
    with pytest.raises(RoundAlreadyReleasedError, match="round 1 of study 'chd'"):
        engine.plan_round(spec, 1, ROWS)
    assert len(ledger.entries("chd")) == 1


def test_a_plan_is_refused_at_charge_time_if_the_site_spent_its_budget_meanwhile() -> None:
    ledger = ledger_with("chd", "stroke", site=1.0)
    engine = PrivacyEngine(ledger)
    plan = engine.plan_round(study("stroke"), 1, ROWS)
    sigma = calibrate_noise(0.95, DELTA, 0.1, 100, "prv")  # the other study takes ε ≈ 0.95
    ledger.charge("chd", 1, noise_multiplier=sigma, sample_rate=0.1, steps=100, payload=b"c")

    with pytest.raises(BudgetExhaustedError) as refused:
        engine.charge(plan, b"stroke round 1")

    assert refused.value.scope == "site"
    assert ledger.entries("stroke") == []


def test_a_plan_without_a_ledger_cannot_be_charged() -> None:
    spec = study()
    plan = PrivacyEngine.plan_local(spec.training, spec.privacy, ROWS)

    with pytest.raises(ValueError, match="no ledger"):
        PrivacyEngine(ledger_with("chd")).charge(plan, b"x")


# -- the DP optimizer --------------------------------------------------------------------------


def test_the_engine_makes_opacus_dp_optimizer_with_the_plans_noise() -> None:
    spec = study()
    model = build_model(spec.model, 5, seed=0)
    plan = Plan(noise_multiplier=1.5, sample_rate=0.25, steps=3, accountant="prv", epsilon=None)

    dp = PrivacyEngine.make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        plan,
        max_grad_norm=0.5,
        num_examples=40,
        generator=torch.Generator().manual_seed(0),
    )

    assert isinstance(dp.optimizer, DPOptimizerFastGradientClipping)
    assert (dp.optimizer.noise_multiplier, dp.optimizer.max_grad_norm) == (1.5, 0.5)
    assert dp.optimizer.expected_batch_size == 10 and dp.sample_rate == 0.25


# -- the accountant registry -------------------------------------------------------------------


def test_accountants_are_looked_up_by_name_and_wrap_opacus() -> None:
    history = [(1.2, 0.05, 200)]
    rdp, prv = RDPAccountant(), PRVAccountant()
    rdp.history, prv.history = list(history), list(history)

    assert accountant_names() == ["prv", "rdp"]
    assert accountant_for("prv")(history, DELTA) == pytest.approx(prv.get_epsilon(delta=DELTA))
    assert accountant_for("rdp")(history, DELTA) <= rdp.get_epsilon(delta=DELTA)  # more orders


def test_an_unknown_accountant_is_refused_with_the_names_there_are() -> None:
    with pytest.raises(UnknownAccountantError, match=r"'gdp'.*prv, rdp"):
        accountant_for("gdp")
    with pytest.raises(UnknownAccountantError, match="prv, rdp"):
        compose_epsilon([(1.0, 0.1, 10)], DELTA, "moments")  # type: ignore[arg-type]
