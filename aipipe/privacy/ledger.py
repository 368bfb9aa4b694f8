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
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from sqlite_utils import Database
from sqlite_utils.db import Table

from aipipe.privacy.accountant import AccountantName, Step, calibrate_noise, compose_epsilon
from aipipe.privacy.cohorts import (
    Cohort,
    CohortBook,
    StudyGroup,
    accounting_groups,
    group_of,
    refusal_note,
)
from aipipe.privacy.errors import (
    BudgetExhaustedError,
    BudgetNotSetError,
    RoundAlreadyChargedError,
    RoundAlreadyReleasedError,
)
from aipipe.privacy.ledger_schema import BUDGET, FRAMES, LEDGER, SITE, ensure_schema

TRAIN = "train"
BASELINE = "baseline"


@dataclass(frozen=True)
class LedgerEntry:
    study: str
    round: int
    epsilon: float  # cumulative ε of the study after this release
    delta: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    accountant: AccountantName
    time: str
    kind: str = TRAIN
    digest: str | None = None  # sha256 of the bytes that left (None: charged before issue 10)
    site_epsilon: float | None = None  # cumulative ε of the site after this release


@dataclass(frozen=True)
class SiteBudget:
    epsilon: float
    delta: float
    explicit: bool  # False: the default, the largest study share


@dataclass(frozen=True)
class BudgetStatus:
    study: str
    epsilon_budget: float
    delta: float
    spent: float
    remaining: float
    rounds: int  # training rounds released (statistics and baselines are releases too)
    group: StudyGroup | None = None  # None: no release yet (its claim is checked at the first)


class BudgetLedger:
    """The site total, each study's share, and every release charged against them (SQLite)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        ensure_schema(db)

    # -- budgets ---------------------------------------------------------------------------

    def set_budget(self, study: str, *, epsilon: float, delta: float) -> None:
        """Set or replace the study's share (ε, δ) of the site; spent ε is recomputed at δ."""
        _check_budget(epsilon, delta)
        with self._write():
            self._budgets.upsert(
                {"study": study, "epsilon_budget": epsilon, "delta": delta}, pk="study"
            )

    def set_site_budget(self, *, epsilon: float, delta: float) -> None:
        """Set the site's total (ε, δ): all studies and queries over its patients together."""
        _check_budget(epsilon, delta)
        with self._write():
            self._site.upsert({"id": 1, "epsilon_budget": epsilon, "delta": delta}, pk="id")

    def budget(self, study: str) -> tuple[float, float]:
        """The study's (ε share, δ); raises `BudgetNotSetError` when there is none."""
        rows = list(self._budgets.rows_where("study = ?", [study]))
        if not rows:
            raise BudgetNotSetError(study)
        return float(rows[0]["epsilon_budget"]), float(rows[0]["delta"])

    def site_budget(self) -> SiteBudget | None:
        """The site total, or its default (the largest share at the smallest δ); None when the
        node has neither a total nor any study share."""
        for row in self._site.rows_where("id = 1"):
            return SiteBudget(float(row["epsilon_budget"]), float(row["delta"]), True)
        shares = list(self._budgets.rows)
        if not shares:
            return None
        epsilon = max(float(r["epsilon_budget"]) for r in shares)
        return SiteBudget(epsilon, min(float(r["delta"]) for r in shares), False)

    # -- what was released -----------------------------------------------------------------

    def entries(self, study: str | None = None) -> list[LedgerEntry]:
        """The study's releases (every study's when None), in the order they were charged."""
        where, args = ("study = ?", [study]) if study is not None else (None, [])
        rows = self._ledger.rows_where(where, args, order_by="time, study, kind, round")
        return [_entry(row) for row in rows]

    def released(
        self, study: str, kind: str, round: int
    ) -> tuple[LedgerEntry, bytes | None] | None:
        """The release of (study, kind, round) and the bytes kept to send again, if any."""
        key = [study, kind, round]
        rows = list(self._ledger.rows_where("study = ? AND kind = ? AND round = ?", key))
        if not rows:
            return None
        frames = list(self._frames.rows_where("study = ? AND kind = ? AND round = ?", key))
        return _entry(rows[0]), (bytes(frames[0]["frame"]) if frames else None)

    def spent(self, study: str) -> float:
        """ε of every step released for the study, composed under its latest accountant."""
        entries = self.entries(study)
        if not entries:
            return 0.0
        _, delta = self.budget(study)
        return compose_epsilon(_history(entries), delta, entries[-1].accountant)

    def site_spent(self) -> float:
        """The site's ε at its δ: the largest, over groups of studies with disjoint cohorts, of
        the composition of the group's releases (one group of all studies not verified
        disjoint; see `cohorts.py`)."""
        entries = self.entries()
        site = self.site_budget()
        if not entries or site is None:
            return 0.0
        return self._site_epsilon(self.groups(), site.delta, entries[-1].accountant)

    def groups(self) -> dict[str, StudyGroup]:
        """Each study with releases: its cohort claim and how it is accounted."""
        return CohortBook(self.db).groups()

    def remaining(self, study: str) -> float:
        epsilon_budget, _ = self.budget(study)
        return max(epsilon_budget - self.spent(study), 0.0)

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
        own, everything = _history(self.entries(study)), self._group_history(plan, study)
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

    def status(self) -> list[BudgetStatus]:
        """Share, spent and remaining ε of every study with a share, by study name."""
        result, groups = [], self.groups()
        for row in self._budgets.rows_where(order_by="study"):
            study = str(row["study"])
            spent = self.spent(study)
            budget = float(row["epsilon_budget"])
            result.append(
                BudgetStatus(
                    study=study,
                    epsilon_budget=budget,
                    delta=float(row["delta"]),
                    spent=spent,
                    remaining=max(budget - spent, 0.0),
                    rounds=self._ledger.count_where("study = ? AND kind = ?", [study, TRAIN]),
                    group=groups.get(study),
                )
            )
        return result

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
        own, everything = _history(self.entries(study)), self._group_history(plan, study)
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

    def _group_history(self, plan: dict[str, StudyGroup], study: str) -> list[Step]:
        """Every step released by the studies of `study`'s group under `plan`."""
        members = accounting_groups(plan, [*plan, study])[group_of(plan, study)]
        return _history([e for e in self.entries() if e.study in members])

    def _site_epsilon(
        self,
        plan: dict[str, StudyGroup],
        delta: float,
        accountant: AccountantName,
        skip: str | None = None,
    ) -> float:
        """Parallel composition (McSherry 2009): groups of studies over disjoint patients do
        not compose, so the site's ε is the largest group's. Holds with the patient as the
        unit (one patient, one row: the feature extraction and keyed split guarantee it)."""
        entries, best = self.entries(), 0.0
        for key, members in accounting_groups(plan, plan).items():
            steps = _history([e for e in entries if e.study in members])
            if key != skip and steps:
                best = max(best, compose_epsilon(steps, delta, accountant))
        return best

    @property
    def _budgets(self) -> Table:
        return cast(Table, self.db[BUDGET])

    @property
    def _site(self) -> Table:
        return cast(Table, self.db[SITE])

    @property
    def _ledger(self) -> Table:
        return cast(Table, self.db[LEDGER])

    @property
    def _frames(self) -> Table:
        return cast(Table, self.db[FRAMES])

    @contextmanager
    def _write(self) -> Iterator[None]:
        # BEGIN IMMEDIATE takes the write lock before the budget is read, so the check and the
        # insert are one step even across processes. Inside a caller's transaction, join it.
        if self.db.conn.in_transaction:
            with self.db.atomic():
                yield
            return
        self.db.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.rollback()
            raise
        self.db.commit()


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


def _check_budget(epsilon: float, delta: float) -> None:
    if epsilon <= 0 or not (0 < delta < 1):
        raise ValueError(f"a budget needs ε > 0 and 0 < δ < 1, got ε={epsilon}, δ={delta}")


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


def _history(entries: list[LedgerEntry]) -> list[Step]:
    return [(e.noise_multiplier, e.sample_rate, e.steps) for e in entries]


def _entry(row: dict[str, Any]) -> LedgerEntry:
    return LedgerEntry(
        study=str(row["study"]),
        round=int(row["round"]),
        epsilon=float(row["epsilon"]),
        delta=float(row["delta"]),
        noise_multiplier=float(row["noise_multiplier"]),
        sample_rate=float(row["sample_rate"]),
        steps=int(row["steps"]),
        accountant=cast(AccountantName, row["accountant"]),
        time=str(row["time"]),
        kind=str(row["kind"]),
        digest=row["digest"],
        site_epsilon=None if row["site_epsilon"] is None else float(row["site_epsilon"]),
    )
