"""The privacy engine: the one place a node plans, charges and runs a DP release.

Modelled on Opacus' `PrivacyEngine.make_private_with_epsilon`, which calibrates σ for a target
ε and wraps the model, optimizer and loader; here the target is not one number but the site's
ledger (`BudgetLedger`): min(the study's share, what is left of the site's group), with every
earlier release composed in. The engine

* **plans** a release: (σ, q = batch/n, steps, the study's ε once it is released). A study keeps
  the σ its first round was planned with; a new one is calibrated over all its rounds;
* **charges** a plan to the ledger with the exact bytes about to leave, in the ledger's one
  transaction (cost, sha256, bytes kept to send again): one release per (study, kind, round),
  so a charged plan cannot release other bytes, and a released round cannot be planned again;
* **makes** the DP-SGD runner (`DPSGD`: Opacus' `DPOptimizerFastGradientClipping` over exact
  per-sample clipping and Poisson batches) from a plan.

Accountants are looked up by name in `aipipe.privacy.accountant`'s registry. The maths stays in
`accountant` and the ledger; the engine only decides what to ask them, so every caller (the
worker's rounds, local training, the solo baseline, the statistics release) plans the same way.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from aipipe.privacy.accountant import (
    AccountantName,
    Step,
    calibrate_noise,
    epsilon_for,
    sample_rate,
)
from aipipe.privacy.cohorts import Cohort
from aipipe.privacy.dpsgd import DPSGD
from aipipe.privacy.errors import RoundAlreadyReleasedError
from aipipe.privacy.ledger import BudgetLedger
from aipipe.privacy.ledger_records import BASELINE, TRAIN, LedgerEntry
from aipipe.privacy.statistics import STATISTICS, STATISTICS_ROUND, noise_multiplier
from aipipe.study.blocks import Privacy, Training
from aipipe.study.spec import StudySpec
from aipipe.wire import SecureMode


@dataclass(frozen=True)
class Plan:
    """One planned release: the Gaussian mechanism (σ, q, steps) and what it will cost.

    `epsilon` is the study's ε once the release is charged (plans made against a ledger), or
    the ε of these steps alone (`plan_local`); None where it was not computed. A plan with no
    `study` was made without a ledger and cannot be charged.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int
    accountant: AccountantName
    epsilon: float | None
    study: str | None = None
    round: int = 0
    kind: str = TRAIN

    @property
    def step(self) -> Step:
        return (self.noise_multiplier, self.sample_rate, self.steps)


class PrivacyEngine:
    """Plans a site's releases against its ledger, charges them, and makes the DP optimizer."""

    def __init__(self, ledger: BudgetLedger) -> None:
        self.ledger = ledger

    # -- planning ----------------------------------------------------------------------------

    def plan_round(
        self, spec: StudySpec, number: int, train_rows: int, cohort: Cohort | None = None
    ) -> Plan:
        """Round `number` of the study on `train_rows` rows, within min(its share, what the
        site's other releases over `cohort` left). Raises `BudgetExhaustedError` when it does
        not fit, `RoundAlreadyReleasedError` when the round left already (send those bytes)."""
        study, ledger = spec.name, self.ledger
        previous = ledger.released(study, TRAIN, number)
        if previous is not None:
            raise RoundAlreadyReleasedError(
                f"round {number} of study '{study}' was released already (sha256 "
                f"{(previous[0].digest or 'not recorded')[:12]}); it is sent again or not at all"
            )
        q = sample_rate(spec.training.batch_size, train_rows)
        steps, accountant = spec.training.local_steps, spec.privacy.accountant
        # A study keeps the σ its first round was planned with; a new one is planned over all
        # its rounds, within min(its share, what the site's other releases left).
        sigma = _kept_sigma(ledger.entries(study), q) or ledger.calibrate(
            study,
            number,
            sample_rate=q,
            steps=spec.training.rounds * steps,
            accountant=accountant,
            cohort=cohort,
            reserve=validation_reserve(spec),
        )
        epsilon = ledger.check(study, number, (sigma, q, steps), accountant, cohort)
        return Plan(sigma, q, steps, accountant, epsilon, study, number)

    def resume_round(
        self, spec: StudySpec, number: int, train_rows: int, noise_multiplier: float
    ) -> Plan:
        """The plan of a round planned by an earlier process (its σ saved with the round)."""
        q = sample_rate(spec.training.batch_size, train_rows)
        steps, accountant = spec.training.local_steps, spec.privacy.accountant
        return Plan(noise_multiplier, q, steps, accountant, None, spec.name, number)

    def plan_baseline(self, spec: StudySpec, train_rows: int) -> Plan:
        """A solo baseline: the study's rounds × local steps as one run, the next baseline
        release of the study, planned within its share and what is left of the site."""
        q = sample_rate(spec.training.batch_size, train_rows)
        steps = spec.training.rounds * spec.training.local_steps
        accountant = spec.privacy.accountant
        number = 1 + sum(e.kind == BASELINE for e in self.ledger.entries(spec.name))
        sigma = self.ledger.calibrate(
            spec.name, number, sample_rate=q, steps=steps, accountant=accountant
        )
        return Plan(sigma, q, steps, accountant, None, spec.name, number, BASELINE)

    @staticmethod
    def plan_statistics(spec: StudySpec) -> Plan:
        """The study's one release of noised preprocessing statistics: a Gaussian step at
        q = 1 costing `privacy.stats_epsilon()` on its own (σ here is z = σ/Δ)."""
        privacy = spec.privacy
        z = noise_multiplier(privacy.stats_epsilon(), privacy.delta, privacy.accountant)
        return Plan(z, 1.0, 1, privacy.accountant, None, spec.name, STATISTICS_ROUND, STATISTICS)

    @staticmethod
    def plan_validation(spec: StudySpec, number: int) -> Plan | None:
        """Round `number`'s validation histogram (one Gaussian step at q = 1 costing
        `validation.epsilon` on its own), or None when the study releases none."""
        reserve = validation_reserve(spec)
        if not reserve:
            return None
        z, _, _ = reserve[0]
        return Plan(z, 1.0, 1, spec.privacy.accountant, None, spec.name, number, VALIDATION)

    @staticmethod
    def plan_local(
        training: Training, privacy: Privacy, rows: int, noise_multiplier: float | None = None
    ) -> Plan:
        """A round of local DP-SGD with no ledger: σ as given, or calibrated so that the whole
        planned study (rounds × local steps) stays within `privacy.epsilon`; `epsilon` is the
        ε of this round's steps alone."""
        q = sample_rate(training.batch_size, rows)
        sigma = noise_multiplier
        if sigma is None:
            planned = training.rounds * training.local_steps
            sigma = calibrate_noise(privacy.epsilon, privacy.delta, q, planned, privacy.accountant)
        elif sigma == 0:
            warnings.warn(
                "noise multiplier 0 under privacy.mode 'dp' gives no privacy (ε = ∞); "
                "the budget ledger will refuse this round",
                stacklevel=3,
            )
        epsilon = epsilon_for(sigma, q, training.local_steps, privacy.delta, privacy.accountant)
        return Plan(sigma, q, training.local_steps, privacy.accountant, epsilon)

    # -- charging ----------------------------------------------------------------------------

    def charge(
        self, plan: Plan, payload: bytes, *, keep: bool = True, cohort: Cohort | None = None
    ) -> LedgerEntry:
        """Charge `plan` with the sha256 of `payload`, the exact bytes about to leave, in one
        transaction (with `keep`, the bytes too, to send again). The same bytes again return
        the same entry; other bytes for a charged round raise `RoundAlreadyReleasedError`, a
        budget spent meanwhile `BudgetExhaustedError`: then nothing may leave."""
        if plan.study is None:
            raise ValueError(
                "this plan was made with no ledger (plan_local) and cannot be charged; "
                "plan the release with plan_round, plan_baseline or plan_statistics"
            )
        return self.ledger.charge(
            plan.study,
            plan.round,
            noise_multiplier=plan.noise_multiplier,
            sample_rate=plan.sample_rate,
            steps=plan.steps,
            accountant=plan.accountant,
            kind=plan.kind,
            payload=payload,
            keep=keep,
            cohort=cohort,
        )

    # -- running -----------------------------------------------------------------------------

    @staticmethod
    def make_private(
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        plan: Plan,
        *,
        max_grad_norm: float,
        num_examples: int,
        generator: torch.Generator,
    ) -> DPSGD:
        """The DP-SGD runner of `plan` over `model`: Poisson batches at q, exact per-sample
        clipping to `max_grad_norm`, Opacus' optimizer adding N(0, σ²C²) to each step."""
        return DPSGD(
            model,
            optimizer,
            noise_multiplier=plan.noise_multiplier,
            max_grad_norm=max_grad_norm,
            sample_rate=plan.sample_rate,
            num_examples=num_examples,
            generator=generator,
        )


def _kept_sigma(entries: list[LedgerEntry], q: float) -> float | None:
    """σ of the study's latest training release at this sample rate, if any."""
    runs = [e for e in entries if e.kind == TRAIN and e.sample_rate == q]
    return runs[-1].noise_multiplier if runs else None


VALIDATION = "validation"  # the ledger kind of a validation histogram


def validation_reserve(spec: StudySpec) -> list[Step]:
    """The validation releases a study's training plan leaves room for: one histogram per
    round (`validation.epsilon`, plaintext studies only; `aipipe.node.validation`)."""
    criteria = spec.validation
    if criteria is None or criteria.epsilon <= 0 or SecureMode(spec.secure) is not SecureMode.NONE:
        return []
    z = noise_multiplier(criteria.epsilon, spec.privacy.delta, spec.privacy.accountant)
    return [(z, 1.0, 1)] * spec.training.rounds
