"""The site ledger's book: the budgets it obeys and the releases it recorded, read back.

`LedgerBook` sets the site total and each study's share, and answers what was released and what
it adds up to (a study's ε, the site's ε under parallel composition across disjoint cohorts, each
study's status). Its write transaction (`_write`) is the one `BudgetLedger.charge` checks and
records a release in.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import cast

from sqlite_utils import Database
from sqlite_utils.db import Table

from aipipe.privacy.accountant import AccountantName, Step, compose_epsilon
from aipipe.privacy.cohorts import CohortBook, StudyGroup, accounting_groups, group_of
from aipipe.privacy.errors import BudgetNotSetError
from aipipe.privacy.ledger_records import (
    TRAIN,
    BudgetStatus,
    LedgerEntry,
    SiteBudget,
    entry_from_row,
    history,
)
from aipipe.privacy.ledger_schema import BUDGET, FRAMES, LEDGER, SITE, ensure_schema


class LedgerBook:
    """Budgets and recorded releases of the site ledger (SQLite); `BudgetLedger` charges them."""

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
        return [entry_from_row(row) for row in rows]

    def released(
        self, study: str, kind: str, round: int
    ) -> tuple[LedgerEntry, bytes | None] | None:
        """The release of (study, kind, round) and the bytes kept to send again, if any."""
        key = [study, kind, round]
        rows = list(self._ledger.rows_where("study = ? AND kind = ? AND round = ?", key))
        if not rows:
            return None
        frames = list(self._frames.rows_where("study = ? AND kind = ? AND round = ?", key))
        return entry_from_row(rows[0]), (bytes(frames[0]["frame"]) if frames else None)

    def spent(self, study: str) -> float:
        """ε of every step released for the study, composed under its latest accountant."""
        entries = self.entries(study)
        if not entries:
            return 0.0
        _, delta = self.budget(study)
        return compose_epsilon(history(entries), delta, entries[-1].accountant)

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

    def _group_history(self, plan: dict[str, StudyGroup], study: str) -> list[Step]:
        """Every step released by the studies of `study`'s group under `plan`."""
        members = accounting_groups(plan, [*plan, study])[group_of(plan, study)]
        return history([e for e in self.entries() if e.study in members])

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
            steps = history([e for e in entries if e.study in members])
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


def _check_budget(epsilon: float, delta: float) -> None:
    if epsilon <= 0 or not (0 < delta < 1):
        raise ValueError(f"a budget needs ε > 0 and 0 < δ < 1, got ε={epsilon}, δ={delta}")
