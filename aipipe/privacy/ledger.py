"""The site ledger: every release of every study on one node's patients, and the budgets it obeys.

A release is (study, round, kind, mechanism (σ, q, steps), δ, digest of the bytes that left):
training updates (kind "train"), a solo baseline ("baseline"), preprocessing statistics
("statistics"), validation histograms ("validation"), later analytics. The patients are the
same whichever study asks, so the SITE's ε is the composition of ALL its releases under the
accountant (PRV convolves a heterogeneous history; RDP adds it order by order), and each study's
ε is the composition of its own. The data steward
sets the site total (ε, δ) and each study's share; a release that would pass either is refused
with the numbers. Until a site total is set, it is the largest study share (at the smallest δ):
a node with one study behaves as before and a second study cannot add to what the first spent.

A release's cost, the sha256 of its exact bytes and (where they can be sent again) the bytes
themselves are written in ONE `BEGIN IMMEDIATE` transaction before they leave, keyed by
(study, kind, round): a re-offered round gets the same bytes again or a refusal, never a second
draw with fresh noise. Cumulative ε per row is kept for display and audit; `spent` recomputes it
from the recorded steps, which are the source of truth. A study whose cohort the node verified
disjoint from every other study's is accounted apart (parallel composition, `cohorts.py`): the
site's ε is the largest of its groups' composed ε, the shared group being all other studies.

The records are `ledger_records.py`'s; `LedgerBook` (``ledger_book.py``) holds the budgets and
reads the releases back; `BudgetLedger`, here, plans a release's σ and charges it.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from datetime import UTC, datetime

from aipipe.privacy.accountant import AccountantName, Step, calibrate_noise, compose_epsilon
from aipipe.privacy.cohorts import Cohort, CohortBook, StudyGroup, group_of, refusal_note
from aipipe.privacy.errors import (
    BudgetExhaustedError,
    RoundAlreadyChargedError,
    RoundAlreadyReleasedError,
)
from aipipe.privacy.ledger_book import LedgerBook
from aipipe.privacy.ledger_records import TRAIN, LedgerEntry, history


class BudgetLedger(LedgerBook):
    """The site total, each study's share, and every release charged against them (SQLite)."""

    # -- planning and charging -------------------------------------------------------------

    def calibrate(
        self,
        study: str,
        round: int,
        *,
        sample_rate: float,
        steps: int,
        accountant: AccountantName,
        cohort: Cohort | None = None,
        reserve: Sequence[Step] = (),
    ) -> float:
        """The σ for `steps` more steps at rate q that keeps the study within min(its share,
        what is left of its group of the site, released over `cohort`): the largest of the σ
        each budget needs given what it spent and the later releases `reserve` leaves room
        for. Raises `BudgetExhaustedError` when a budget has nothing left to plan with."""
        share, delta = self.budget(study)
        site = self.site_budget()
        assert site is not None  # the study has a share, so the site has at least the default
        plan = CohortBook(self.db).plan(study, cohort)
        own, everything = history(self.entries(study)), self._group_history(plan, study)
        own, everything = [*own, *reserve], [*everything, *reserve]
        sigma = 0.0
        for scope, target, at, prior in (
            ("study", share, delta, own),
            ("site", site.epsilon, site.delta, everything),
        ):
            spent = compose_epsilon(prior, at, accountant)
            if spent >= target:
                fresh = calibrate_noise(share, delta, sample_rate, steps, accountant)
                needed = compose_epsilon([*prior, (fresh, sample_rate, steps)], at, accountant)
                raise _refusal(study, round, scope, needed - spent, spent, target, plan)
            # ε falls as σ grows, so a σ that already keeps this budget is the larger of the two
            # answers: one composition instead of a calibration's search (about 1 s with PRV).
            if (
                sigma
                and compose_epsilon([*prior, (sigma, sample_rate, steps)], at, accountant) <= target
            ):
                continue
            sigma = calibrate_noise(target, at, sample_rate, steps, accountant, prior=prior)
        return sigma

    def check(
        self,
        study: str,
        round: int,
        step: Step,
        accountant: AccountantName,
        cohort: Cohort | None = None,
    ) -> float:
        """The study's ε after releasing `step` over `cohort`, or `BudgetExhaustedError` if the
        study's share or the site's total would not hold it. Writes nothing."""
        plan = CohortBook(self.db).plan(study, cohort)
        study_after, _ = self._fits(study, round, step, accountant, plan)
        return study_after

    def charge(
        self,
        study: str,
        round: int,
        *,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        accountant: AccountantName = "prv",
        kind: str = TRAIN,
        payload: bytes | None = None,
        keep: bool = True,
        cohort: Cohort | None = None,
    ) -> LedgerEntry:
        """Record a release and return its entry, or refuse it.

        `payload` is the exact bytes about to leave: its sha256 is written with the cost in one
        transaction, and with `keep` the bytes too, so that a re-offer can send them again.
        Raises `BudgetExhaustedError` (nothing written) when the study's share or the site's
        total would be passed. A release of (study, kind, round) that exists already is
        returned when it is the same (same bytes, or no bytes and the same mechanism), and
        refused otherwise: one release per round. `cohort` is the release's patients (keyed
        hashes) and the study's claim; it is recorded, and the groups re-checked, in the same
        transaction (None: not known, so the study, and any disjoint study, is shared).
        """
        step = (noise_multiplier, sample_rate, steps)
        digest = None if payload is None else hashlib.sha256(payload).hexdigest()
        with self._write():
            previous = self.released(study, kind, round)
            if previous is not None:
                return _same_release(previous[0], step, accountant, digest)
            book = CohortBook(self.db)
            plan = book.plan(study, cohort)
            study_after, site_after = self._fits(study, round, step, accountant, plan)
            _, delta = self.budget(study)
            entry = LedgerEntry(
                study=study,
                round=round,
                epsilon=study_after,
                delta=delta,
                noise_multiplier=noise_multiplier,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
                time=datetime.now(UTC).isoformat(timespec="microseconds"),
                kind=kind,
                digest=digest,
                site_epsilon=site_after,
            )
            self._ledger.insert(entry.__dict__)
            if payload is not None and keep:
                self._frames.insert(
                    {"study": study, "kind": kind, "round": round, "frame": payload}
                )
            book.record(study, cohort, plan)
            return entry

    def _fits(
        self,
        study: str,
        round: int,
        step: Step,
        accountant: AccountantName,
        plan: dict[str, StudyGroup],
    ) -> tuple[float, float]:
        """(study ε, site ε) after `step`, grouped as `plan` says, or `BudgetExhaustedError`.
        Only the study's group gains a step; a group it absorbs (a disjoint claim it breaks)
        is in its history, so checking that group checks every group that changes."""
        share, delta = self.budget(study)
        site = self.site_budget()
        assert site is not None
        own, everything = history(self.entries(study)), self._group_history(plan, study)
        after = []
        for scope, target, at, prior in (
            ("study", share, delta, own),
            ("site", site.epsilon, site.delta, everything),
        ):
            before = compose_epsilon(prior, at, accountant)
            then = compose_epsilon([*prior, step], at, accountant)
            if then > target:
                raise _refusal(study, round, scope, then - before, before, target, plan)
            after.append(then)
        others = self._site_epsilon(plan, site.delta, accountant, skip=group_of(plan, study))
        return after[0], max(after[1], others)


def _refusal(
    study: str,
    round: int,
    scope: str,
    needed: float,
    spent: float,
    budget: float,
    plan: dict[str, StudyGroup],
) -> BudgetExhaustedError:
    """The refusal of a release that the study's share or the site's total cannot hold."""
    note = refusal_note(plan[study]) if scope == "site" else ""
    return BudgetExhaustedError(
        study=study, round=round, needed=needed, spent=spent, budget=budget, scope=scope, note=note
    )


def _same_release(
    previous: LedgerEntry, step: Step, accountant: AccountantName, digest: str | None
) -> LedgerEntry:
    what = f"{previous.kind} round {previous.round} of study '{previous.study}'"
    if previous.digest is not None or digest is not None:
        if previous.digest != digest:
            raise RoundAlreadyReleasedError(
                f"{what} was released already (sha256 {(previous.digest or 'unknown')[:12]}); "
                "the node sends those bytes again or nothing, never a new draw"
            )
        return previous
    sigma, q, steps = step
    same = (
        math.isclose(previous.noise_multiplier, sigma, rel_tol=1e-12)
        and math.isclose(previous.sample_rate, q, rel_tol=1e-12)
        and previous.steps == steps
        and previous.accountant == accountant
    )
    if not same:
        raise RoundAlreadyChargedError(
            f"round {previous.round} of study '{previous.study}' was charged with "
            f"σ={previous.noise_multiplier:g}, q={previous.sample_rate:g}, {previous.steps} steps "
            f"({previous.accountant}); a resumed round must run with the same settings"
        )
    return previous
